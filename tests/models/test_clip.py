"""Image-report CLIP: contract on tiny configs, tokenizer validation, retrieval and zero-shot
metrics, the shipped vocabulary, and CLIP batches from ``StudyDataset`` through the engine."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from client.data.dataset import StudyDataset
from client.data.site import Study
from client.engine import Engine, TrainConfig
from medfed.synth.phantom import CLASS_NAMES, sample_lesion
from medfed.synth.reports import write_report
from models import TASKS
from models.clip import CLIPConfig, CLIPModel, clip_loss, recall_at_k
from models.metrics import SplitMetrics, macro_auroc
from models.tasks import batch_coupling, build
from models.text import (SHIPPED_TOKENIZERS, load_tokenizer,
                         tokenizer_fingerprint)
from protocol.metrics import to_record

ROOT = Path(__file__).resolve().parents[2]
VIT = {"dim": 32, "depth": 1, "heads": 2, "img_size": 32, "patch_size": 8, "num_classes": 3}
VIT_3D = VIT | {"spatial_dims": 3, "patch_size": 16}
TEXT = {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64,
        "embed_dim": 16, "max_length": 40, "class_names": list(CLASS_NAMES)}
REPORTS = ("Irregular ring enhancement with central necrosis in the right frontal lobe.",
           "Non-enhancing infiltrative lesion in the left parietal lobe, likely low-grade glioma.",
           "CSF-like cystic lesion that suppresses on FLAIR; most likely a simple cyst.",
           "Faint patchy enhancement and mild surrounding oedema in the left occipital lobe.",
           "No abnormal enhancement. No surrounding oedema.",
           "Extensive vasogenic oedema with mild local mass effect.")


def _batch(task, b: int = 6, dims: int = 2, has_report=None, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    present = torch.ones(b, 4, dtype=torch.bool)
    present[0, 1] = False
    image = torch.randn(b, 4, *([32] * dims), generator=g) * present[(...,) + (None,) * dims]
    has = torch.ones(b, dtype=torch.bool) if has_report is None else torch.tensor(has_report)
    return ({"image": image, "present": present, "label": torch.arange(b) % 3}
            | task.tokenize([REPORTS[i % len(REPORTS)] for i in range(b)]) | {"has_report": has})


def _evaluate(task, model, *batches) -> SplitMetrics:
    evaluator = task.evaluator()
    for batch in batches:
        evaluator.update(model, batch)
    return evaluator.compute()


class _GivenEmbeddings:
    """Stands in for a CLIPModel whose embeddings are given: a batch's ``image`` rows are the
    image embeddings and its ``input_ids`` rows the report embeddings."""

    def encode_image(self, images, present):
        return images

    def encode_text(self, input_ids, attention_mask):
        return input_ids

    def scale(self):
        return torch.tensor(1.0)

    def similarity_logits(self, image, text):
        return self.scale() * image.float() @ text.float().t()

    def per_sample_loss(self, logits):
        return clip_loss(logits)


def _build(vit=VIT, **options):
    torch.manual_seed(0)
    return build("mmvit", vit, "clip", TEXT | options)


def test_builds_from_config_with_both_towers():
    from transformers import BertModel

    model, task = _build()
    assert isinstance(model, CLIPModel) and model.backbone.head is None
    assert isinstance(model.text, BertModel)
    assert model.text.config.vocab_size == CLIPConfig().vocab_size
    assert task.data_needs.reports is not None and task.data_needs.unlabelled
    assert "batch" in batch_coupling("clip")          # InfoNCE: not DP-SGD ready
    assert TASKS.config("clip", {"num_classes": 3}).num_classes == 3   # what the server passes


def test_trains_with_a_finite_decreasing_loss():
    model, task = _build()
    batch = _batch(task, has_report=[True] * 5 + [False])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(10):
        torch.manual_seed(0)
        out = task.step(model, batch)
        assert torch.isfinite(out.loss) and out.n == 5
        optimizer.zero_grad()
        out.loss.backward()
        assert model.logit_scale.grad is not None
        assert model.text.embeddings.word_embeddings.weight.grad.abs().sum() > 0
        optimizer.step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    assert out.metrics["report_fraction"] == pytest.approx(5 / 6)


def test_studies_without_a_report_are_left_out_of_the_loss():
    model, task = _build()
    model.eval()
    batch = _batch(task, b=4, has_report=[True, True, True, False])
    other = dict(batch, image=batch["image"].clone(), input_ids=batch["input_ids"].clone())
    other["image"][3] += 5.0
    other["input_ids"][3, 1:5] = 7
    torch.testing.assert_close(task.step(model, batch).loss, task.step(model, other).loss)


@pytest.mark.parametrize("has_report", [[False] * 4, [True, False, False, False]])
def test_fewer_than_two_reports_give_a_zero_loss_with_zero_gradients(has_report):
    model, task = _build()
    out = task.step(model, _batch(task, b=4, has_report=has_report))
    assert out.loss.item() == 0.0 and out.n == 0
    out.loss.backward()
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())


def test_logit_scale_is_clamped_like_clip():
    model, _ = _build()
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    assert model.scale().item() == pytest.approx(100.0)


def test_state_dict_round_trips():
    model, task = _build()
    torch.manual_seed(1)
    other, _ = build("mmvit", VIT, "clip", TEXT)
    other.load_state_dict(model.state_dict())
    model.eval(), other.eval()
    batch = _batch(task)
    torch.testing.assert_close(task.step(model, batch).loss, task.step(other, batch).loss)
    got, want = _evaluate(task, model, batch), _evaluate(task, other, batch)
    assert got.auroc is not None and got.scalars() == pytest.approx(want.scalars())


def test_three_dimensional_input():
    model, task = _build(VIT_3D)
    out = task.step(model, _batch(task, b=3, dims=3))
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.n == 3


def test_clip_loss_matches_the_symmetric_cross_entropy():
    logits = torch.tensor([[5.0, 0.0, 0.0], [0.0, 1.0, 3.0], [1.0, 0.0, 2.0]])
    target = torch.arange(3)
    expected = (torch.nn.functional.cross_entropy(logits, target)
                + torch.nn.functional.cross_entropy(logits.t(), target)) / 2
    torch.testing.assert_close(clip_loss(logits).mean(), expected)


# --- configuration errors (the server turns these into ConfigError before training) ------

def test_tokenizer_is_named_never_given_by_path(tmp_path):
    with pytest.raises(ValueError, match="never reads a path"):
        TASKS.config("clip", {"tokenizer_dir": str(tmp_path / "nowhere")})
    with pytest.raises(ValueError, match="no shipped tokenizer hashes to"):
        TASKS.config("clip", {"tokenizer_dir": "0" * 64})
    by_name = TASKS.config("clip", {"tokenizer_dir": "report_vocab"})
    by_hash = TASKS.config("clip", {"tokenizer_dir": tokenizer_fingerprint()})
    assert by_name.vocab_size == by_hash.vocab_size == 693


def test_tokenizer_that_does_not_match_the_text_tower_is_refused(tmp_path, monkeypatch):
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "lesion", "cyst", "##s"]
    (tmp_path / "vocab.txt").write_text("\n".join(tokens) + "\n")
    monkeypatch.setitem(SHIPPED_TOKENIZERS, "test-tiny", tmp_path)   # as if shipped
    with pytest.raises(ValueError, match=r"has 8 tokens but the text tower's vocab_size is 693"):
        TASKS.config("clip", {"tokenizer_dir": "test-tiny"})
    config = TASKS.config("clip", {"tokenizer_dir": "test-tiny", "vocab_size": 8})
    with pytest.raises(ValueError, match="tokenizer_sha256"):
        CLIPConfig(tokenizer_dir="test-tiny", vocab_size=8, tokenizer_sha256="0" * 64)
    _, task = build("mmvit", VIT, "clip", TEXT | {"tokenizer_dir": "test-tiny",
                                                 "vocab_size": config.vocab_size})
    assert task.tokenize(["cysts"])["input_ids"][0, :4].tolist() == [2, 6, 7, 3]


def test_a_shipped_tokenizer_in_either_layout_tokenizes_like_the_default(tmp_path,
                                                                        monkeypatch):
    default = load_tokenizer()
    (tmp_path / "json").mkdir(), (tmp_path / "txt").mkdir()
    default.save(str(tmp_path / "json" / "tokenizer.json"))
    vocab = sorted(default.get_vocab(), key=default.token_to_id)
    (tmp_path / "txt" / "vocab.txt").write_text("\n".join(vocab) + "\n")
    expected = TASKS.build("clip", TEXT).tokenize(REPORTS)
    for layout in ("json", "txt"):
        monkeypatch.setitem(SHIPPED_TOKENIZERS, f"test-{layout}", tmp_path / layout)
        local = TASKS.build("clip", TEXT | {"tokenizer_dir": f"test-{layout}"})
        for key, value in local.tokenize(REPORTS).items():
            torch.testing.assert_close(value, expected[key])
    CLIPConfig(tokenizer_sha256=tokenizer_fingerprint())   # the shipped file hashes to itself


def test_class_names_must_match_num_classes():
    with pytest.raises(ValueError, match="one name per class"):
        TASKS.config("clip", {"num_classes": 2, "class_names": list(CLASS_NAMES)})


# --- evaluation -----------------------------------------------------------------------

def test_recall_at_k_on_hand_made_embeddings():
    # Image i's own report is ranked: 1st, 2nd, 3rd, 1st.
    similarity = np.array([[0.90, 0.10, 0.20, 0.00],
                           [0.95, 0.70, 0.10, 0.00],
                           [0.50, 0.60, 0.40, 0.10],
                           [0.00, 0.10, 0.20, 0.30]])
    assert recall_at_k(similarity, 1) == 0.5
    assert recall_at_k(similarity, 2) == 0.75
    assert recall_at_k(similarity, 3) == 1.0
    assert recall_at_k(similarity.T, 1) == 0.75     # report -> image: report 0 prefers image 1
    assert recall_at_k(np.ones((4, 4)), 1) == 0.0   # ties count against: collapse scores 0
    assert recall_at_k(np.zeros((0, 0)), 5) == 0.0


def test_recall_spans_the_whole_evaluated_set_not_one_batch():
    _, task = _build(class_names=[])                       # recall only: no zero-shot prompts
    e = task.config.embed_dim
    emb = torch.eye(e)[:6]                                 # six orthogonal studies
    text = emb.clone()
    text[5] = emb[0]                                       # study 5's report looks like study 0's
    has = torch.tensor([1, 1, 1, 1, 1, 0]).bool()          # ... but study 5 has no report

    def batches(text):                                     # three batches, one evaluated set
        return [{"image": emb[i:i + 2], "present": torch.ones(2, 4), "input_ids": text[i:i + 2],
                 "attention_mask": torch.ones(2, 1), "has_report": has[i:i + 2],
                 "label": torch.arange(i, i + 2) % 3} for i in (0, 2, 4)]

    summary = _evaluate(task, _GivenEmbeddings(), *batches(text))
    assert summary.n == 6 and summary.counts["n_reports"] == 5.0
    assert summary.means["recall_i2r_1"] == 1.0 and summary.means["recall_r2i_1"] == 1.0
    # InfoNCE within each batch; the last batch's one report joins the batch before it
    within = torch.cat([clip_loss(emb[0:2] @ text[0:2].t()), clip_loss(emb[2:5] @ text[2:5].t())])
    assert summary.loss == pytest.approx(float(within.mean()))
    text[1] = emb[0]                                       # now two reports tie for image 0
    summary = _evaluate(task, _GivenEmbeddings(), *batches(text))
    assert summary.means["recall_i2r_1"] == pytest.approx(3 / 5)
    assert summary.means["recall_i2r_5"] == 1.0
    assert summary.auroc is None


def test_zero_shot_auroc_is_defined_and_keys_are_fixed():
    model, task = _build()
    model.eval()
    batch = _batch(task, has_report=[True, True, False, True, True, True])
    summary = _evaluate(task, model, batch)
    has = batch["has_report"]
    with torch.no_grad():
        image = model.encode_image(batch["image"], batch["present"])
        text = model.encode_text(batch["input_ids"], batch["attention_mask"])
        prompts = model.encode_text(task.prompt_tokens["input_ids"],
                                    task.prompt_tokens["attention_mask"])
        zero_shot = (model.scale() * image @ prompts.t()).softmax(-1)
        within = clip_loss(model.scale() * image[has] @ text[has].t())   # study 2 left out
    torch.testing.assert_close(zero_shot.sum(1), torch.ones(6))
    assert summary.auroc == pytest.approx(macro_auroc(batch["label"].numpy(), zero_shot.numpy()),
                                          abs=1e-6)
    assert 0.0 <= summary.auroc <= 1.0
    assert summary.loss == pytest.approx(float(within.mean()), rel=1e-5)
    empty = task.evaluator().compute()
    assert empty.n == 0 and empty.auroc is None
    assert set(to_record(summary, "val")) == set(to_record(empty, "val"))   # fixed keys
    assert task.prompts[0] == "findings consistent with high grade glioma"
    _, unnamed = _build(class_names=[])                    # no names: no zero-shot AUROC
    assert _evaluate(unnamed, model, batch).auroc is None
    lone = _batch(task, b=2, has_report=[True, False], seed=1)   # joins the batch before it
    summary = _evaluate(task, model, batch, lone)
    with torch.no_grad():
        joined = [model.encode_image(lone["image"][:1], lone["present"][:1]),
                  model.encode_text(lone["input_ids"][:1], lone["attention_mask"][:1])]
        six = clip_loss(model.scale() * torch.cat([image[has], joined[0]])
                        @ torch.cat([text[has], joined[1]]).t())
    assert summary.loss == pytest.approx(float(six.mean()), rel=1e-5)
    assert summary.counts["n_reports"] == 6.0 and summary.n == 8   # 6 ranked for recall



def _given_batch(image: torch.Tensor, text: torch.Tensor, has: list[bool]) -> dict:
    """A batch for ``_GivenEmbeddings``: its rows are the studies' embeddings."""
    b = len(has)
    return {"image": image, "present": torch.ones(b, 4), "input_ids": text,
            "attention_mask": torch.ones(b, 1), "has_report": torch.tensor(has),
            "label": torch.zeros(b, dtype=torch.int64)}


def test_the_clip_loss_does_not_depend_on_which_group_is_scored_last_under_autocast():
    """The engine evaluates under bf16 autocast on a GPU (``update``), but the last contrast
    group is scored in ``compute``, outside it: every group is scored in float32, so two
    batches give the same loss in either order, equal to the float32 reference."""
    class Sharp(_GivenEmbeddings):
        def scale(self):
            return torch.tensor(50.0)

    _, task = _build(class_names=[])
    e = task.config.embed_dim
    torch.manual_seed(0)
    emb = F.normalize(torch.randn(8, e), dim=-1)
    text = F.normalize(emb + 0.5 * torch.randn(8, e), dim=-1)
    first, second = (_given_batch(emb[i:i + 4], text[i:i + 4], [True] * 4) for i in (0, 4))

    def loss(order) -> float:
        evaluator = task.evaluator()
        for batch in order:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                evaluator.update(Sharp(), batch)
        return evaluator.compute().loss

    reference = torch.cat([clip_loss(50.0 * emb[i:i + 4] @ text[i:i + 4].t())
                           for i in (0, 4)]).mean()
    assert loss([first, second]) == loss([second, first]) == pytest.approx(float(reference),
                                                                          rel=1e-5)


def test_a_lone_report_in_a_batch_is_contrasted_and_the_pooled_loss_is_the_mean_over_reports():
    """A batch holding one report (the rest of its studies without one) has nothing to
    contrast it with; left out of its site's loss while ``n_reports``, the loss's weight in
    the pool, still counted it, the pooled loss was biased. The lone report now joins the
    group of the batch before it (a first batch's, the batch after it), so each site's loss is
    the mean over all of its ``n_reports`` studies and the pooled loss (after the wire codec)
    the mean over every site's: each report's InfoNCE within its group, weighed once."""
    from protocol.metrics import from_record
    from strategies.pooling import pool

    _, task = _build(class_names=[])
    e = task.config.embed_dim
    torch.manual_seed(3)
    emb = F.normalize(torch.randn(12, e), dim=-1)
    text = F.normalize(emb + 0.8 * torch.randn(12, e), dim=-1)
    # Site A: batches of 3; the first (study 0) and the last (study 9) hold a lone report.
    has_a = [True, False, False, True, True, True, True, True, False, True, False, False]
    a = _evaluate(task, _GivenEmbeddings(),
                  *[_given_batch(emb[i:i + 3], text[i:i + 3], has_a[i:i + 3])
                    for i in (0, 3, 6, 9)])
    groups = [[0, 3, 4, 5], [6, 7, 9]]       # 0 joins the batch after, 9 the batch before
    per_study = torch.cat([clip_loss(emb[g] @ text[g].t()) for g in groups])
    assert a.counts["n_reports"] == 7.0 == len(per_study) and a.n == 12
    assert a.loss == pytest.approx(float(per_study.mean()), rel=1e-6)
    # Site B: two batches of two reports, no lone one.
    b = _evaluate(task, _GivenEmbeddings(), _given_batch(emb[:2], text[:2], [True, True]),
                  _given_batch(emb[2:4], text[2:4], [True, True]))
    per_study_b = torch.cat([clip_loss(emb[i:i + 2] @ text[i:i + 2].t()) for i in (0, 2)])
    sites = [from_record(to_record(m, "val"), "val") for m in (a, b)]
    pooled = pool(sites)
    assert pooled["n_reports"] == 11.0
    assert pooled["loss"] == pytest.approx(float(torch.cat([per_study, per_study_b]).mean()),
                                           rel=1e-6)
    assert set(a.counts) == {"n_reports"}       # no count of the lone reports is sent


def test_a_split_with_a_single_report_has_no_loss_and_weighs_nothing_in_the_pooled_loss():
    """One report in a whole split (a floor-1 site can send it): no InfoNCE, 0.0 sent, and the
    pooled loss is the other sites' alone - the 0.0 weighs nothing (recall@k, trivially 1,
    still weighs its one report)."""
    from strategies.pooling import pool

    _, task = _build(class_names=[])
    e = task.config.embed_dim
    emb = torch.eye(e)[:4]
    one = _evaluate(task, _GivenEmbeddings(), _given_batch(emb[:2], emb[:2], [True, False]))
    assert one.loss == 0.0 and one.counts["n_reports"] == 1.0
    assert one.studies("loss") == 0.0 and one.studies("recall_i2r_1") == 1.0
    other = _evaluate(task, _GivenEmbeddings(), _given_batch(emb, 0.5 * emb, [True] * 4))
    assert other.loss > 0
    assert pool([one, other])["loss"] == pytest.approx(other.loss)


def test_a_diverged_models_nan_loss_is_reported_not_dropped():
    """A study whose embeddings are NaN (a diverged model) makes its group's loss NaN: the
    split's loss says so (``SplitMetrics``: reported, not hidden), it is not the mean of the
    other studies."""
    _, task = _build(class_names=[])
    emb = torch.eye(task.config.embed_dim)[:4]
    diverged = emb.clone()
    diverged[3] = float("nan")
    summary = _evaluate(task, _GivenEmbeddings(), _given_batch(emb[:2], emb[:2], [True] * 2),
                        _given_batch(diverged[2:], diverged[2:], [True] * 2))
    assert np.isnan(summary.loss) and summary.counts["n_reports"] == 4.0

def test_a_split_with_lone_reports_is_not_suppressed_by_the_site_floor():
    """The site holds back a split any of whose counts (and their differences) is below its
    floor (``client.queries.split_counts``). A split of 9 studies, all with a report, in
    batches of 4, 4 and 1 (a lone report): its counts are n = n_reports = 9 and one class of
    9, all at or above a floor of 4, so it is sent - a count of the lone (or contrasted)
    reports beside them would be 1 (or differ from n_reports by 1) and suppress it."""
    from client.queries import has_small_count, split_counts

    _, task = _build(class_names=[])
    e = task.config.embed_dim
    emb = torch.eye(e)[:9]
    metrics = _evaluate(task, _GivenEmbeddings(),
                        *[_given_batch(emb[i:i + 4], emb[i:i + 4], [True] * len(emb[i:i + 4]))
                          for i in (0, 4, 8)])
    assert metrics.n == 9 and dict(metrics.counts) == {"n_reports": 9.0}
    counts = split_counts(metrics, torch.zeros(9, dtype=torch.int64), 3, multi_label=False)
    assert not has_small_count(counts, 4)
    assert has_small_count(counts, 10)                # the floor does bite above the counts

# --- the shipped vocabulary -----------------------------------------------------------

def _synthetic_reports(n: int = 90) -> list[str]:
    rng = np.random.default_rng(0)
    missing = [(), ("T1ce",), ("FLAIR",), ("T1", "T2")]
    return [write_report(sample_lesion(i % 3, rng), rng, referring="Whitcombe^Eleanor",
                         missing=missing[i % 4], pixel_mm=0.9) for i in range(n)]


def test_default_vocabulary_tokenizes_the_synthetic_reports():
    task = TASKS.build("clip", {"class_names": list(CLASS_NAMES)})
    out = task.tokenize(_synthetic_reports())
    unk = load_tokenizer().token_to_id("[UNK]")
    real = out["attention_mask"].bool()
    assert (out["input_ids"][real] == unk).float().mean() < 0.005
    assert not out["truncated"].any()                      # default max_length fits them
    assert not (task.prompt_tokens["input_ids"] == unk).any()


def _build_script():
    spec = importlib.util.spec_from_file_location("build_report_vocab",
                                                  ROOT / "scripts" / "build_report_vocab.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_shipped_tokenizer_is_what_the_build_script_makes():
    script = _build_script()
    assert set(script.VOCABULARIES) == set(SHIPPED_TOKENIZERS)
    for name, directory in SHIPPED_TOKENIZERS.items():
        vocab = script.build_vocab(name)
        assert script.tokenizer_json(vocab) == (directory / "tokenizer.json").read_text("utf-8")
        assert not set(vocab) & {w.lower() for w in ("Okonkwo", "Whitcombe", "Eleanor")}
    assert len(script.build_vocab()) == CLIPConfig().vocab_size == load_tokenizer().get_vocab_size()
    # the radiology vocabulary holds every default token (their ids differ: a separate file)
    default, radiology = script.build_vocab(), script.build_vocab("radiology_vocab")
    assert set(default) < set(radiology)


# --- data path: StudyDataset(text_transform=task.tokenize) through the engine ---------

def _studies(n: int = 8) -> list[Study]:
    rng = np.random.default_rng(0)
    reports = _synthetic_reports(n)
    return [Study(key=f"s{i}", patient_key=f"p{i}", label=i % 3,
                  images={seq: rng.normal(size=(40, 40)).astype(np.float32)
                          for seq in ("T1", "T2", "FLAIR")},
                  report=None if i == 3 else ("  " if i == 5 else reports[i]))
            for i in range(n)]


def test_dataset_items_carry_tokenized_reports():
    model, task = _build()
    studies = _studies()
    plain = StudyDataset(studies, image_size=32)
    with_text = StudyDataset(studies, image_size=32, text_transform=task.tokenize)
    assert set(plain[0]) == {"image", "present", "label"}
    item = with_text[0]
    assert set(item) == {"image", "present", "label", "input_ids", "attention_mask",
                         "truncated", "has_report"}
    torch.testing.assert_close(item["image"], plain[0]["image"])
    assert item["input_ids"].shape == (TEXT["max_length"],)
    assert [bool(with_text[i]["has_report"]) for i in range(8)] == \
        [True, True, True, False, True, False, True, True]
    assert with_text[3]["attention_mask"].sum() == 2       # "" -> [CLS] [SEP]

    engine = Engine(task, torch.device("cpu"))
    fit = engine.fit(model, with_text, TrainConfig(batch_size=4, lr=1e-3))
    assert np.isfinite(fit["train_loss"]) and fit["steps"] == 2
    metrics = engine.evaluate(model, with_text, batch_size=3).scalars()
    assert metrics["n_reports"] == 6.0 and 0.0 <= metrics["recall_i2r_5"] <= 1.0
    assert "auroc" in metrics
