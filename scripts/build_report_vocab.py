"""Build the shipped WordPiece report tokenizers in ``models/assets/``.

The tokenizer is part of the CLIP model definition and must be identical at every site, so
its vocabulary comes only from public material, never from a site's reports:

1. ``TERMINOLOGY`` below - common words of radiology reporting (anatomy, MRI technique,
   signal and morphology descriptors, neuro-oncology and general findings, report
   boilerplate), written out by hand from public reporting lexicons and structured-report
   templates;
2. the words of the synthetic report templates (``write_report`` and ``_lobe`` in
   ``medfed/synth/reports.py``), read from the source with ``ast``. The fake patient and
   physician names of that module are not templates and are left out.

Two tokenizers are built. ``report_vocab`` (the default) has the brain MRI words above.
``radiology_vocab`` adds ``CHEST_TERMINOLOGY`` (chest radiography) and the words of the
synthetic chest report template (``write_chest_report`` in ``medfed/synth/chest.py``): with the
default vocabulary, chest words split into single characters and about 29% of the synthetic
chest reports ran past 128 tokens. It is a separate file so the default's token ids, and every
brain CLIP model trained with them, stay as they are (``pretrain=clip_chest`` selects it).

The vocabulary is: the five BERT special tokens; every ASCII letter, digit and punctuation
mark, alone and as a ``##`` continuation (so any ASCII word has a WordPiece split and
``[UNK]`` is left for non-ASCII symbols); common medical suffix pieces; then the whole
words, sorted. Words are normalised exactly as the tokenizer will see them (BERT
normaliser, lower case, accents stripped; BERT pre-tokenizer). The file written is the whole
tokenizer pipeline (``models.text.wordpiece_tokenizer``) as ``tokenizer.json``: Flower app
bundles carry ``*.json`` files but not ``*.txt``.

Usage::

    python scripts/build_report_vocab.py          # (re)write both shipped tokenizer.json files
    python scripts/build_report_vocab.py --check  # exit 1 if a shipped file is stale

After a change, set ``CLIPConfig.vocab_size`` (report_vocab) or ``vocab_size`` in
``conf/pretrain/clip_chest.yaml`` (radiology_vocab) to the size this prints.
"""

from __future__ import annotations

import argparse
import ast
import string
import sys
from pathlib import Path

from tokenizers import normalizers, pre_tokenizers

ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = ROOT / "medfed" / "synth" / "reports.py"
CHEST_TEMPLATES = ROOT / "medfed" / "synth" / "chest.py"
ASSETS = ROOT / "models" / "assets"
OUTPUT = ASSETS / "report_vocab" / "tokenizer.json"

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
TEMPLATE_FUNCTIONS = ("write_report", "_lobe")

# Public radiology reporting terminology (hand-written; no site data).
TERMINOLOGY = """
abnormal abnormality abnormalities absent absence acquired acquisition acute adjacent
advised age agent air alignment anterior apex apparent appearance appearances approximately
aqueduct arachnoid area areas artefact artefacts artifact artifacts arterial artery arteries
assessed assessment asymmetric asymmetry atrophy atypical axial

basal basilar benign bilateral biopsy bleed blood bone border borders brain brainstem
bright broad

calcification calcifications calcified callosum calvarium canal capsule carotid cause
caudate cavernoma cavernous cavity central centre center centrum cerebellar cerebellum
cerebral cerebrospinal cerebrum change changes chiasm choroid chronic cingulate circumscribed
cistern cisterns clinical clinically clivus collection comparison compatible component
components compression concern confluent consistent contrast contusion cord corona coronal
corpus cortex cortical cranial craniotomy csf cyst cystic cysts

decreased deep defect definite deformity degenerative demonstrated demyelination density
deposition diagnosis differential diffuse diffusion dilatation dilated discussed displacement
distortion dominant dorsal drainage dural dura

edema effacement effect effusion embolic encephalomalacia enhancement enhancing enlarged
enlargement ependymal ependymoma epidural equivocal evaluation evidence excluded expansion
extension extensive extra extraaxial extracranial

face facial falx fat feature features fibres fibers finding findings fissure flair flow
fluid focal foci focus follow foramen fossa fourth fracture frontal further

gadolinium ganglia gemistocytic glial glioblastoma glioma gliomas gliosis globus gradient
grade gray grey gyral gyri gyrus

haemorrhage haemorrhagic hemorrhage hemorrhagic hemisphere hemispheric heterogeneous
hippocampal hippocampus history homogeneous horn horns hydrocephalus hyperintense
hyperintensity hyperintensities hypointense hypointensity hypophysis hypothalamus

identified images imaging impression increased indeterminate infarct infarction inferior
infiltrating infiltration infiltrative inflammatory infratentorial internal interval
intra intraaxial intracranial intraventricular irregular ischaemic ischemic isointense

junction

lacunar large lateral left lentiform lesion lesions leptomeningeal likely limited linear
lobar lobe lobes lobulated local localised localized lower

magnetic malignant malignancy mammillary marked markedly mass masses matter maximal measures
measuring medial medulla medullary meningeal meninges meningioma mesial metastases metastasis
metastatic microvascular midbrain midline mild minimal mixed moderate morphology motion
multifocal multiple

necrosis necrotic neoplasm neoplastic nerve nerves neural no nodular nodule nodules
non normal nucleus

oblique occipital oedema oedematous oligodendroglioma optic orbit orbits

pallidus parenchyma parenchymal parietal partial patchy pathology perfusion peripheral
periventricular pineal pituitary pons pontine possible post posterior postoperative pre
predominantly prior probable progression prominent protocol

radiation radiological radiologist recommend recommended recurrence reduced region regions
relative remains residual resection resolution resonance restricted restriction right ring
round

sagittal sampling scan scattered sclerosis sellar sequence sequences septum series shift
sign signal significant simple sinus sinuses size slice slices small soft space spaces spin
spinal stable stenosis stroke structure structures subacute subarachnoid subcortical subdural
subfalcine substantia suggest suggested suggestive sulcal sulci superior supratentorial
surgical surrounding suspected suspicious sylvian symmetric symmetrical

temporal tentorium thalamic thalamus thickening thin third tissue tonsillar tract transverse
trauma tumor tumour tumours tumors

uncal uncertain unchanged underlying unremarkable upper

vascular vasogenic vein veins venous ventricle ventricles ventricular vermis vertebral
vessel vessels volume

weighted white within without

accompanying affecting all along also an and appears are as at be been before both but by
can cannot compared could demonstrates does due either for from has have in is it its may
measurement measurements more most noted of on or other over seen shows since suggests than
that the there these this to was were which while with

mri mr ct pet dwi adc swi gre tse fse ffe mpr mprage dti dsc dce rcbv cbf cbv t1 t2 t1w t2w
t1ce pd cm mm ml sd iv
""".split()

# Chest radiography reporting terms (hand-written from public reporting templates; no site data).
CHEST_TERMINOLOGY = """
airspace airspaces angle angles aorta aortic ap apical apices aspiration atelectasis
atelectatic azygos bibasilar blunting breath bronchial bronchiectasis bronchovascular bulla
bullae cardiac cardiomediastinal cardiomegaly cardiopulmonary catheter catheters cavitary
chest clavicle clavicles clear congestion consolidation consolidations costal costophrenic
cough crowding diaphragm diaphragmatic dyspnea effusions emphysema endotracheal fever
fibrosis fibrotic fissural frontal granuloma granulomas granulomatous heart hemidiaphragm
hemidiaphragms hila hilar hilum hyperexpanded hyperinflated hyperinflation indication
infection infiltrate infiltrates inspiration interstitial kerley lingula lingular lung lungs
mediastinal mediastinum meniscus nasogastric opacification opacities opacity osseous pa
pacemaker parenchyma picc pleura pleural pneumonia pneumonic pneumoperitoneum pneumothorax
portable projects radiograph radiographs reticular retrocardiac rib ribs scarring segmental
setting shortness silhouette sternotomy subcutaneous subsegmental supine thoracic thorax
trachea tracheal tube tubes upright vascularity view views wires zone zones
""".split()

SUFFIX_PIECES = ("s", "es", "ed", "ing", "al", "ial", "ic", "ical", "ly", "ity", "ous", "ion",
                 "ation", "ment", "ness", "oma", "omas", "itis", "osis", "ectomy", "otomy",
                 "ography", "ogram", "ular", "ary", "ar", "ive", "ent", "ence", "er", "ers")


def normalise(text: str) -> list[str]:
    """The words the default tokenizer's normaliser and pre-tokenizer make of ``text``."""
    norm = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True,
                                      strip_accents=True, lowercase=True)
    return [w for w, _ in pre_tokenizers.BertPreTokenizer().pre_tokenize_str(
        norm.normalize_str(text))]


def template_words(path: Path = TEMPLATES,
                   functions: tuple[str, ...] = TEMPLATE_FUNCTIONS) -> set[str]:
    """Words of the string literals (f-string parts included) of the report templates."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    words: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name in functions:
            body = node.body[1:] if ast.get_docstring(node) else node.body
            leaves = [leaf for stmt in body for leaf in ast.walk(stmt)]
            # ".1f" in f"{size:.1f}" is a format, not report text
            formats = {id(c) for leaf in leaves if isinstance(leaf, ast.FormattedValue)
                       and leaf.format_spec is not None for c in ast.walk(leaf.format_spec)}
            words.update(w for leaf in leaves if isinstance(leaf, ast.Constant)
                         and isinstance(leaf.value, str) and id(leaf) not in formats
                         for w in normalise(leaf.value))
    return words


# name -> (terms, (template file, its template functions), ...)
VOCABULARIES = {
    "report_vocab": (TERMINOLOGY, ((TEMPLATES, TEMPLATE_FUNCTIONS),)),
    "radiology_vocab": (TERMINOLOGY + CHEST_TERMINOLOGY,
                        ((TEMPLATES, TEMPLATE_FUNCTIONS),
                         (CHEST_TEMPLATES, ("write_chest_report",)))),
}


def build_vocab(name: str = "report_vocab") -> list[str]:
    """The vocabulary ``name``, one token per entry, in file order (ids are line numbers)."""
    terms, templates = VOCABULARIES[name]
    chars = string.ascii_lowercase + string.digits + string.punctuation
    words: set[str] = set()
    for path, functions in templates:
        words.update(template_words(path, functions))
    for term in terms:
        words.update(normalise(term))
    words = {w for w in words if len(w) > 1 and w.isascii() and w.isalnum()}
    tokens = [*SPECIAL_TOKENS, *chars, *(f"##{c}" for c in string.ascii_lowercase + string.digits),
              *sorted(f"##{s}" for s in SUFFIX_PIECES), *sorted(words)]
    seen: set[str] = set()
    return [t for t in tokens if not (t in seen or seen.add(t))]


def tokenizer_json(vocab: list[str]) -> str:
    """The shipped file: the default pipeline around ``vocab``, serialised."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from models.text import wordpiece_tokenizer

    return wordpiece_tokenizer(vocab).to_str(pretty=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="compare with the shipped file instead of writing it")
    args = parser.parse_args(argv)
    stale = 0
    for name in VOCABULARIES:
        vocab = build_vocab(name)
        text, output = tokenizer_json(vocab), ASSETS / name / "tokenizer.json"
        if args.check:
            current = output.read_text(encoding="utf-8") if output.exists() else ""
            if current != text:
                print(f"{output.relative_to(ROOT)} is stale; rerun without --check",
                      file=sys.stderr)
                stale = 1
            continue
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text, encoding="utf-8")
        print(f"wrote {output.relative_to(ROOT)}: {len(vocab)} tokens")
    return stale


if __name__ == "__main__":
    raise SystemExit(main())
