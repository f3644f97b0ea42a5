"""The bundled dataset: generated clinical-triage questions -> the department that should see them.

Each record is a short case ("A 64-year-old man reports crushing chest pain and shortness of breath
for two days. Which department should see this patient?") and its answer, one department name.
Records come from several "hospitals", each with its own mix of specialties, so the natural split
over hospitals is non-IID. Generation is seeded and deterministic; nothing here is real patient data.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Any

SPECIALTIES: dict[str, list[str]] = {
    "Cardiology": [
        "crushing chest pain",
        "palpitations",
        "an irregular heartbeat",
        "swollen ankles",
        "chest tightness on exertion",
        "fainting during exercise",
        "a racing pulse",
        "high blood pressure readings",
    ],
    "Neurology": [
        "sudden weakness on one side",
        "slurred speech",
        "a severe headache with numbness",
        "recurrent seizures",
        "tingling in both hands",
        "loss of balance",
        "drooping of one eyelid",
        "memory lapses",
    ],
    "Orthopedics": [
        "knee pain after a fall",
        "a swollen ankle after a sprain",
        "lower back pain when lifting",
        "a painful shoulder that will not move",
        "a deformed wrist after a fall",
        "hip pain when walking",
        "a suspected broken finger",
        "stiffness in the spine",
    ],
    "Dermatology": [
        "an itchy rash",
        "a changing mole",
        "red scaly patches on the elbows",
        "blisters on the skin",
        "severe acne",
        "hives after eating",
        "a non-healing skin sore",
        "hair falling out in patches",
    ],
    "Gastroenterology": [
        "blood in the stool",
        "heartburn after meals",
        "persistent diarrhea",
        "yellowing of the eyes",
        "cramping abdominal pain",
        "vomiting after meals",
        "difficulty swallowing",
        "bloating and constipation",
    ],
    "Pulmonology": [
        "a chronic cough",
        "wheezing at night",
        "coughing up blood",
        "shortness of breath at rest",
        "a cough with green sputum",
        "snoring with pauses in breathing",
        "chest pain when breathing in",
        "a long history of smoking and breathlessness",
    ],
}

# hospital -> relative weight of each specialty (same order as SPECIALTIES)
HOSPITALS: dict[str, list[float]] = {
    "st-heart": [0.55, 0.05, 0.05, 0.05, 0.05, 0.25],
    "city-neuro-ortho": [0.05, 0.45, 0.40, 0.03, 0.04, 0.03],
    "riverside-clinic": [0.05, 0.05, 0.05, 0.45, 0.35, 0.05],
    "county-general": [0.17, 0.17, 0.17, 0.17, 0.16, 0.16],
}

_SUBJECTS = ["man", "woman", "boy", "girl", "patient"]
_DURATIONS = ["since this morning", "for two days", "for a week", "for a month", "on and off for a year"]
_TEMPLATES = [
    "A {age}-year-old {who} reports {s1} and {s2} {dur}. Which department should see this patient?",
    "Triage: {age}-year-old {who} with {s1}, {s2}, {dur}. Which department?",
    "A {who} aged {age} presents with {s1} {dur}, plus {s2}. Refer to which department?",
]


def generate(num_records: int, seed: int = 0) -> list[dict[str, Any]]:
    """``num_records`` seeded triage records with keys question, answer, specialty, hospital, id."""

    def question(rng: random.Random, hospital: str, s1: str, s2: str) -> str:
        return rng.choice(_TEMPLATES).format(
            age=rng.randint(4, 90), who=rng.choice(_SUBJECTS), s1=s1, s2=s2, dur=rng.choice(_DURATIONS)
        )

    return [
        {"id": i, "question": text, "answer": specialty, "specialty": specialty, "hospital": hospital}
        for i, hospital, specialty, text in mixture(num_records, seed, SPECIALTIES, HOSPITALS, question)
    ]


def mixture(
    num_records: int,
    seed: int,
    classes: dict[str, list[str]],
    groups: dict[str, list[float]],
    text: Callable[[random.Random, str, str, str], str],
) -> Iterator[tuple[int, str, str, str]]:
    """(index, group, class, text) of seeded non-IID records: the groups take turns, each draws its
    class from its own weights (in the order of ``classes``) and ``text(rng, group, cue, cue)`` writes
    the record from two different cues of that class. Also the generator of ``bench/userdata.py``."""
    rng = random.Random(seed)
    names = list(classes)
    order = list(groups)
    for i in range(num_records):
        group = order[i % len(order)]
        label = rng.choices(names, weights=groups[group])[0]
        c1, c2 = rng.sample(classes[label], 2)
        yield i, group, label, text(rng, group, c1, c2)
