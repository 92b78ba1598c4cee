"""Free-text radiology reports and realistic (fake) PHI for synthetic studies.

Report wording is derived from the same lesion parameters that drew the pixels, so a report
agrees with its images and its label the way a real one does (mostly; impressions hedge).
"""

from __future__ import annotations

import numpy as np

from .phantom import LesionParams

_FIRST = ("James", "Maria", "Wei", "Aisha", "Olivia", "Mateo", "Hannah", "Kofi", "Ingrid",
          "Rahul", "Sofia", "Dmitri", "Yuki", "Fatima", "Liam", "Chloe", "Omar", "Greta")
_LAST = ("Okonkwo", "Lindqvist", "Castellanos", "Nakamura", "Abernathy", "Kowalczyk",
         "Fitzgerald", "Haddad", "Van der Berg", "Moreau", "Oyelaran", "Takahashi",
         "Pellegrini", "Brennan", "Achterberg", "Szabo", "Delacroix", "Ramaswamy")
_PHYSICIANS = ("Whitcombe^Eleanor", "Adeyemi^Tunde", "Rasmussen^Karl", "Quintero^Lucia")


def fake_phi(rng: np.random.Generator, site_index: int, patient_index: int) -> dict[str, str]:
    """Patient-level identifiers in DICOM formats (PN, LO, DA)."""
    year = int(rng.integers(1938, 2004))
    month, day = int(rng.integers(1, 13)), int(rng.integers(1, 29))
    last, first = _LAST[rng.integers(len(_LAST))], _FIRST[rng.integers(len(_FIRST))]
    return {
        "PatientName": f"{last}^{first}",
        "PatientID": f"MRN{site_index}{patient_index:03d}{int(rng.integers(10**5, 10**6))}",
        "PatientBirthDate": f"{year:04d}{month:02d}{day:02d}",
        "PatientSex": "F" if rng.random() < 0.5 else "M",
        "ReferringPhysicianName": _PHYSICIANS[rng.integers(len(_PHYSICIANS))],
    }


def fake_accession(rng: np.random.Generator) -> str:
    """An accession number (the PACS order ID of a study: an identifier, like the MRN)."""
    return f"ACC{int(rng.integers(10**7, 10**8))}"


def _lobe(lesion: LesionParams) -> str:
    side = "right" if lesion.cx < 0 else "left"     # radiological convention
    lobe = "frontal" if lesion.cy < -0.15 else ("occipital" if lesion.cy > 0.25 else "parietal")
    return f"{side} {lobe}"


def write_report(lesion: LesionParams, rng: np.random.Generator, *, referring: str,
                 missing: tuple[str, ...], pixel_mm: float) -> str:
    """A findings + impression report consistent with the lesion that was rendered."""
    size_cm = 2 * lesion.radius * 32 * pixel_mm / 10
    where = _lobe(lesion)
    parts = [f"TECHNIQUE: Axial MRI of the brain. Sequences: "
             f"{', '.join(s for s in ('T1', 'T1 post-contrast', 'T2', 'FLAIR') if s not in missing)}."]
    t2 = "markedly hyperintense" if lesion.t2_core > 1.75 else "hyperintense"
    parts.append(f"FINDINGS: There is a {size_cm:.1f} cm lesion in the {where} lobe, {t2} on T2.")
    if "T1ce" in missing:
        parts.append("Post-contrast images were not acquired; enhancement cannot be assessed.")
    elif lesion.enhancement > 0.45:
        parts.append("There is irregular ring enhancement with central non-enhancing necrosis.")
    elif lesion.enhancement > 0.2:
        parts.append("There is faint patchy enhancement.")
    else:
        parts.append("No abnormal enhancement.")
    if lesion.flair_core < 0.9:
        parts.append("The lesion suppresses on FLAIR, following CSF signal on all sequences.")
    else:
        parts.append("The lesion is hyperintense on FLAIR.")
    if lesion.oedema > 1.6:
        parts.append("Extensive surrounding vasogenic oedema with mild local mass effect.")
    elif lesion.oedema > 1.25:
        parts.append("Mild surrounding T2/FLAIR signal abnormality.")
    else:
        parts.append("No surrounding oedema.")
    impression = {
        0: ("Findings are most consistent with a high-grade glioma.",
            "Appearance suggests a high-grade glial neoplasm; tissue sampling recommended."),
        1: ("Findings favour a low-grade glioma.",
            "Non-enhancing infiltrative lesion, likely low-grade glioma; follow-up advised."),
        2: ("Findings are consistent with a simple cyst.",
            "CSF-like cystic lesion, most likely benign (arachnoid/neuroglial cyst)."),
    }[lesion.label][int(rng.integers(2))]
    parts.append(f"IMPRESSION: {impression}")
    if rng.random() < 0.3:
        parts.append(f"Results discussed with Dr. {referring.split('^')[0]}.")
    return " ".join(parts)
