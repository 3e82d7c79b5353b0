"""A built-in sample of synthetic clinical notes, so the main job runs on a fresh machine.

The notes are generated, not real: no patient data. Each note belongs to one specialty; "easy"
notes state it plainly, "hard" ones mix findings of two specialties, so an early-exit model has
both samples to let go early and samples that need depth.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

SPECIALTIES: dict[str, list[str]] = {
    "cardiology": [
        "chest pain radiating to the left arm", "troponin elevated", "ST elevation in leads II, III and aVF",
        "atrial fibrillation with rapid ventricular response", "ejection fraction of 35 percent",
        "started on heparin drip and aspirin", "murmur at the left sternal border", "bilateral pitting edema",
    ],
    "respiratory": [
        "productive cough for five days", "oxygen saturation 88 percent on room air", "crackles at the right base",
        "chest x-ray shows a right lower lobe consolidation", "wheezing on expiration", "started on albuterol nebulizers",
        "history of COPD on home oxygen", "shortness of breath on exertion",
    ],
    "gastroenterology": [
        "epigastric pain after meals", "melena for two days", "elevated lipase", "tender right upper quadrant",
        "colonoscopy showed a sessile polyp", "nausea and vomiting since yesterday", "elevated liver enzymes",
        "started on pantoprazole",
    ],
    "neurology": [
        "sudden onset right-sided weakness", "slurred speech noted by family", "CT head negative for hemorrhage",
        "new onset seizure witnessed at home", "severe headache with photophobia", "left facial droop",
        "MRI shows an acute infarct in the left MCA territory", "started on levetiracetam",
    ],
}
LABELS: tuple[str, ...] = tuple(SPECIALTIES)
FILLER = [
    "Patient is a {age}-year-old {sex} presenting to the emergency department.",
    "Vital signs were reviewed.", "Past medical history is notable for hypertension.",
    "Medications were reconciled with the pharmacy.", "Family at bedside.", "Plan discussed with the patient.",
    "Will continue to monitor overnight.", "No known drug allergies.", "Social history is noncontributory.",
]


@dataclass(frozen=True)
class SampleNote:
    note_id: str
    text: str
    label: str
    difficulty: str  # "easy" or "hard"


def generate_notes(n: int, seed: int = 0, hard_fraction: float = 0.3) -> list[SampleNote]:
    """``n`` synthetic notes, deterministic for a seed."""
    rng = random.Random(seed)
    notes = []
    for i in range(n):
        label = rng.choice(LABELS)
        hard = rng.random() < hard_fraction
        findings = rng.sample(SPECIALTIES[label], k=rng.randint(2, 4) if not hard else 2)
        if hard:
            other = rng.choice([lab for lab in LABELS if lab != label])
            findings += rng.sample(SPECIALTIES[other], k=1)
        filler = [f.format(age=rng.randint(25, 90), sex=rng.choice(["man", "woman"])) for f in rng.sample(FILLER, k=rng.randint(1, 5))]
        sentences = filler[:1] + [f"{f[0].upper()}{f[1:]}." for f in findings] + filler[1:]
        rng.shuffle(sentences)
        notes.append(SampleNote(f"note-{i:05d}", " ".join(sentences), label, "hard" if hard else "easy"))
    return notes
