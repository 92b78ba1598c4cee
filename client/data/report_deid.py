"""De-identification of free-text radiology reports, at the site, before any use.

A report is read from ``reports.jsonl`` and tokenized for the image-report objective (CLIP);
the text itself never leaves the site, but the model trained on it does, and a text model can
memorise rare strings (a name, an MRN) and give them back. So identifiers are removed as the
report is read, the same way the DICOM reader drops header PHI (:mod:`client.data.dicom`):
nothing downstream ever sees the original text.

What is removed, in the spirit of the HIPAA Safe Harbor identifiers that occur in radiology
reports (rule-based, as in the ``deid``/Philter family of scrubbers; a site with a
certified de-identification pipeline runs it on ``reports.jsonl`` first):

- person names after a title (``Dr.``, ``Doctor``, ``Mr/Mrs/Ms``, ``Prof``), after a
  ``Patient:``/``Name:``/``Referring:`` style label, and DICOM person names (``Last^First``);
- dates in numeric (``2024-03-07``, ``07/03/2024``, ``20240307``) and written forms
  (``7 March 2024``, ``March 7, 2024``, ``Mar 2024``);
- telephone numbers; identifiers: any token holding four or more consecutive digits (MRN, accession, phone,
  UID), and the value after an ``MRN``/``ID``/``Accession`` label;
- e-mail addresses.

Measurements (``3.2 cm``, ``12 mm``), laterality, anatomy and findings are kept: they are
what the objective learns from. Each removal becomes a placeholder (``[NAME]``, ``[DATE]``,
``[ID]``) so the sentence keeps its shape.
"""

from __future__ import annotations

import re

_MONTHS = ("jan(?:uary)?|feb(?:ruary)?|mar(?:ch)?|apr(?:il)?|may|june?|july?|aug(?:ust)?|"
           "sep(?:t(?:ember)?)?|oct(?:ober)?|nov(?:ember)?|dec(?:ember)?")
# A capitalised name word, with the particles of compound surnames (Van der Berg, de la Cruz).
# Title case only (Whitcombe, O'Brien, McDonald): report headings are upper case (IMPRESSION).
_NAME_WORD = r"[A-Z][a-z'][A-Za-z'\-]*"
_NAME = rf"{_NAME_WORD}(?:\s+(?:(?:van|von|der|den|de|la|le|da|di|du|del|al|bin|ibn)\s+)*{_NAME_WORD})*"

# A labelled field's value in any case (SMITH, JOHN; smith john), a title and an initial
# allowed (Dr. A. Whitcombe): up to four words, to the first other punctuation.
_FIELD_WORD = r"[A-Za-z][A-Za-z'\-]*"
_FIELD_NAME = (rf"(?:(?:Dr|Doctor|Prof|Mr|Mrs|Ms|Miss)\.?\s+)?(?:[A-Za-z]\.\s*)?"
               rf"{_FIELD_WORD}(?:(?:,\s*|[ \t]+){_FIELD_WORD}){{0,3}}")

# Order matters: labelled fields first (their values may hold digits or dates), then names,
# dates, and last any remaining digit run.
_RULES: tuple[tuple[re.Pattern, str], ...] = (
    (re.compile(r"\b[\w.+-]+@[\w-]+(?:\.[\w-]+)+\b"), "[EMAIL]"),
    (re.compile(r"(?i)\b(MRN|patient\s+id|ID|accession(?:\s+(?:no|number))?|acc)\b"
                r"(\s*[:#.]?\s*)[A-Za-z]*\d[\w\-/]*"), r"\1\2[ID]"),
    (re.compile(rf"(?i)\b(patient|name|patient\s+name|referring(?:\s+physician)?|"
                rf"attending|radiologist|physician|signed\s+by|dictated\s+by)(\s*:\s*)"
                rf"{_FIELD_NAME}"), r"\1\2[NAME]"),
    # After a title, an initial may come first, and one upper-case surname counts (Dr. SMITH).
    (re.compile(rf"\b(Dr|Doctor|Prof|Mr|Mrs|Ms|Miss)(\.?\s+)(?:[A-Z]\.\s*)?"
                rf"(?:{_NAME}|[A-Z][A-Z'\-]+\b)"), r"\1\2[NAME]"),
    (re.compile(r"\b[A-Za-z'\-]+\^[A-Za-z'\-^]*"), "[NAME]"),                 # DICOM PN
    (re.compile(r"\b\d{4}[-/.]\d{1,2}[-/.]\d{1,2}\b"), "[DATE]"),
    (re.compile(r"(?:\+\d{1,3}[\s.-]?)?(?:\(\d{3}\)|\b\d{3})[\s.-]?\d{3}[\s.-]\d{4}\b"
                r"|\b\d{3}-\d{4}\b"), "[PHONE]"),
    (re.compile(r"\b\d{1,2}[-/.]\d{1,2}[-/.]\d{2,4}\b"), "[DATE]"),
    (re.compile(rf"(?i)\b\d{{1,2}}(?:st|nd|rd|th)?\s+(?:of\s+)?(?:{_MONTHS})\.?,?\s+\d{{2,4}}\b"),
     "[DATE]"),
    (re.compile(rf"(?i)\b(?:{_MONTHS})\.?\s+\d{{1,2}}(?:st|nd|rd|th)?,?\s+\d{{2,4}}\b"), "[DATE]"),
    (re.compile(rf"(?i)\b(?:{_MONTHS})\.?\s+\d{{4}}\b"), "[DATE]"),
    (re.compile(r"\b[A-Za-z]*\d{4,}[\w\-]*"), "[ID]"),        # MRN, accession, phone, UID, 8-digit date
)


def deidentify_report(text: str) -> tuple[str, int]:
    """``text`` with names, dates and identifiers replaced by placeholders, and how many
    were replaced (a count, safe to log)."""
    total = 0
    for pattern, placeholder in _RULES:
        text, n = pattern.subn(placeholder, text)
        total += n
    return text, total
