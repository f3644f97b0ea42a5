"""A user-style own-data task: IT-helpdesk tickets -> the team that should handle them.

The bundled tasks are ours; this one stands in for a user's file. It goes through the documented
own-data path (``data.source: tickets.jsonl`` with the user's own column names: ``ticket`` is the
prompt, ``team`` the answer and the label, ``site`` the client column of the natural partitioner) and
has its own label names, so a recipe tuned on the triage task is checked on data it was not tuned on.
Each of the four sites (offices) has its own mix of teams (non-IID). Generation is seeded and
deterministic; nothing here is real.

    .venv/bin/python bench/userdata.py bench/out/tickets.jsonl [--records 4000] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Any

import common  # noqa: F401  (puts this checkout first on sys.path: its fedslm)

from fedslm.triage import mixture

TEAMS: dict[str, list[str]] = {
    "Network Operations": [
        "the wifi keeps dropping",
        "the VPN will not connect",
        "the office network is very slow",
        "I cannot reach the shared drive",
        "the ethernet port at my desk is dead",
        "video calls freeze and cut out",
        "DNS errors when opening internal sites",
        "the guest network asks for a password nobody knows",
    ],
    "Identity and Access": [
        "I am locked out of my account",
        "my password expired and the reset link fails",
        "I need access to the finance folder",
        "the two-factor code never arrives",
        "a new hire has no login yet",
        "my badge does not open the door",
        "single sign-on loops back to the login page",
        "please remove access for a leaver",
    ],
    "Workplace Hardware": [
        "my laptop will not turn on",
        "the printer on floor two jams",
        "my monitor flickers",
        "the docking station does not charge",
        "the keyboard is missing keys",
        "I need a replacement headset",
        "the laptop battery drains in an hour",
        "the projector in the meeting room has no signal",
    ],
    "Email and Calendar": [
        "emails to customers bounce",
        "my mailbox is full",
        "meeting invites show the wrong time",
        "the shared calendar is not visible",
        "attachments are stripped from mail",
        "an out-of-office reply will not switch off",
        "my distribution list lost its members",
        "mail from a partner lands in spam",
    ],
    "Security Response": [
        "I clicked a link in a phishing email",
        "antivirus found malware on my laptop",
        "files were renamed and encrypted",
        "someone logged in to my account from abroad",
        "a USB stick was found in the car park",
        "I lost my company phone",
        "a caller asked for my password",
        "strange pop-ups ask me to install software",
    ],
    "Business Applications": [
        "the expense tool rejects my receipts",
        "the CRM will not save a contact",
        "the payroll report shows an error",
        "a spreadsheet macro stopped working",
        "the timesheet app crashes on submit",
        "I need a license for the design software",
        "the invoice export is empty",
        "the inventory system shows old stock counts",
    ],
}

# site -> relative weight of each team (same order as TEAMS)
SITES: dict[str, list[float]] = {
    "berlin-hq": [0.30, 0.30, 0.10, 0.10, 0.10, 0.10],
    "lisbon-dev": [0.10, 0.05, 0.40, 0.05, 0.10, 0.30],
    "austin-sales": [0.05, 0.10, 0.10, 0.45, 0.05, 0.25],
    "remote-staff": [0.25, 0.15, 0.10, 0.10, 0.35, 0.05],
}

COLUMNS = {"prompt": "ticket", "response": "team", "label": "team", "client": "site"}

_WHEN = ["since this morning", "since yesterday", "for a week", "again today", "after the last update"]
_TEMPLATES = [
    "Hi, {p1} {when}, and {p2}. Which team should take this ticket?",
    "Ticket from {site}: {p1}; also {p2}. Route to which team?",
    "Help please: {p1} {when}. Also {p2}. Which team handles this?",
]


def generate(num_records: int, seed: int = 0) -> list[dict[str, Any]]:
    """``num_records`` seeded tickets with keys id, ticket, team, site (sites take turns)."""

    def ticket(rng: random.Random, site: str, p1: str, p2: str) -> str:
        return rng.choice(_TEMPLATES).format(p1=p1, p2=p2, when=rng.choice(_WHEN), site=site)

    return [
        {"id": i, "ticket": text, "team": team, "site": site}
        for i, site, team, text in mixture(num_records, seed, TEAMS, SITES, ticket)
    ]


def overrides(path: Path | str) -> list[str]:
    """The config overrides that train on a tickets file: the own-data keys README documents."""
    return [
        f"data.source={path}",
        f"data.prompt_column={COLUMNS['prompt']}",
        f"data.response_column={COLUMNS['response']}",
        f"data.label_column={COLUMNS['label']}",
        f"data.client_column={COLUMNS['client']}",
        "data.partitioner=natural",
        "data.system_prompt=Answer with the team only.",
    ]


def write(path: Path, num_records: int, seed: int) -> Path:
    """Write the tickets as JSONL (one object a line) to ``path``, creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(rec) + "\n" for rec in generate(num_records, seed)))
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="the .jsonl file to write")
    parser.add_argument("--records", type=int, default=4000, help="tickets over all sites (default 4000)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.out.suffix != ".jsonl":
        sys.exit(f"userdata: {args.out} must end in .jsonl (data.source picks the reader by suffix)")
    if args.records < 20:
        sys.exit(f"userdata: --records {args.records} is below data's minimum of 20")
    write(args.out, args.records, args.seed)
    print(f"wrote {args.records} tickets ({len(TEAMS)} teams, {len(SITES)} sites, seed {args.seed}) to {args.out}")


if __name__ == "__main__":
    main()
