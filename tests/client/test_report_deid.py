"""Report de-identification at the site: the identifiers a reporting system writes into a
report (the synthetic chest departments write them, as real exports do) are gone from every
report the site reader hands on, and the clinical wording the objective learns from is not."""

from __future__ import annotations

import re

import pytest

from client.data.layout import load_layout
from client.data.layout_site import read_site
from client.data.report_deid import deidentify_report
from medfed.synth.chest import (CLASS_NAMES, generate_chest_site, make_chest_profiles,
                                synthesize_chest)


def _identifiers(study) -> set[str]:
    """The PHI a study's raw report may hold: name parts, MRN, birth date, accessions."""
    last, first = study.phi["PatientName"].split("^")
    values = {last, first, study.phi["PatientID"], *study.phi["ReferringPhysicianName"].split("^")}
    values.update(re.findall(r"ACC\d+", study.report))
    values.update(re.findall(r"\d{4}-\d{2}-\d{2}|\d{2}/\d{2}/\d{4}|\d{1,2} March 2024",
                             study.report))
    return values


def _leaks(text: str, values: set[str]) -> list[str]:
    return [v for v in values if re.search(rf"(?<![A-Za-z0-9]){re.escape(v)}(?![A-Za-z0-9])", text)]


@pytest.mark.parametrize("text, gone, kept", [
    ("Results discussed with Dr. Whitcombe. IMPRESSION: small effusion.", ["Whitcombe"],
     ["IMPRESSION: small effusion."]),
    ("Patient: Van der Berg, Ingrid. MRN: MRN0001234567.", ["Berg", "Ingrid", "1234567"],
     ["Patient: [NAME]", "MRN: [ID]"]),
    ("COMPARISON: 2023-04-12 and 03/04/2023 (accession ACC12345678).",
     ["2023", "ACC12345678"], ["COMPARISON: [DATE]"]),
    ("Dictated by Dr. J. Smith on 7 March 2024; Dr. SMITH; Mrs O'Brien; Okonkwo^James.",
     ["Smith", "SMITH", "O'Brien", "Okonkwo", "March"], ["Dictated by Dr. [NAME]"]),
    ("Call (617) 555-1234 or j.doe@hospital.org.", ["555", "j.doe"], ["[PHONE]", "[EMAIL]"]),
    # a labelled field in any case, and a title inside it (these survived before)
    ("Referring: Dr. A. Whitcombe\nFINDINGS: clear.", ["Whitcombe"],
     ["Referring: [NAME]", "FINDINGS: clear."]),
    ("Patient: SMITH, JOHN. No effusion.", ["SMITH", "JOHN"], ["Patient: [NAME]. No effusion."]),
    ("Name: smith john; seen today.", ["smith", "john"], ["Name: [NAME]; seen today."]),
    ("A 3.2 cm lesion in the right frontal lobe, 12 mm shift. Sequences: T1, T2, FLAIR.", [],
     ["A 3.2 cm lesion in the right frontal lobe, 12 mm shift. Sequences: T1, T2, FLAIR."]),
])
def test_identifiers_are_replaced_and_clinical_text_kept(text, gone, kept):
    out, n = deidentify_report(text)
    for value in gone:
        assert value not in out, (value, out)
    for part in kept:
        assert part in out, (part, out)
    assert (n > 0) == bool(gone)


def test_synthetic_chest_reports_carry_phi_and_none_survives_the_site_reader(tmp_path):
    profile = make_chest_profiles(1, seed=5, patients=24)[0]
    generated = generate_chest_site(profile, seed=5)
    raw_leaks = sum(bool(_leaks(s.report, _identifiers(s) - {s.phi["PatientID"]}))
                    for s in generated.studies)
    # The control: the exported reports do hold identifiers beyond the physician's name.
    assert raw_leaks >= 5
    assert any("MRN" in s.report for s in generated.studies)
    assert any("accession ACC" in s.report for s in generated.studies)

    synthesize_chest(tmp_path / "data", n_sites=1, seed=5, patients=24)
    data = read_site(tmp_path / "data" / "site-0", load_layout("chest_xray"), CLASS_NAMES)
    texts = [s.report for s in data.studies if s.report]
    assert len(texts) == len(data.studies) == len(generated.studies)
    everything = set().union(*(_identifiers(s) for s in generated.studies))
    for text in texts:
        assert not _leaks(text, everything), (_leaks(text, everything), text)
        assert not re.search(r"\d{4}", text) and "^" not in text
        assert text.startswith("TECHNIQUE:") or text.startswith("Patient: [NAME]")
        assert "IMPRESSION:" in text and "FINDINGS:" in text
