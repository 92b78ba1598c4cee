"""DP-SGD at a site: exact one-pass per-sample clipping, secure noise, Poisson sampling, engine.

The reference for every per-sample quantity is the definition itself: one backward pass per
sample through the real task, loss multiplied by n exactly as ``PrivateGradients`` does.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from client.data.dataset import StudyDataset
from client.data.site import load_site
from client.engine import Engine, TrainConfig
from client.privacy.dpsgd import DPSGDConfig, PrivateGradients, poisson_batches, steps_per_epoch
from client.privacy.noise import GaussianNoise
from client.privacy.persample import PerSampleClipper, UnsupportedLayerError
from models import MODELS, TASKS
from models.vit import MultiModalViT, ViTConfig
from tests.conftest import CLASSES

SMALL = ViTConfig(dim=32, depth=2, heads=2, img_size=32, patch_size=8)   # 65 tokens, narrow:
# every Linear materialises g_i^T a_i. WIDE (17 tokens, wide layers): every Linear with more
# than one token takes the ghost-norm path, input Gram taken in the forward hook; it has the
# cross-sequence fusion MLP of the production config (SMALL leaves it out: its wide input
# would take the ghost path and SMALL would no longer test the direct one alone).
WIDE = ViTConfig(dim=96, depth=2, heads=2, img_size=16, patch_size=8, sequence_fusion=True)
TINY_OPTIONS = {"dim": 32, "depth": 1, "heads": 2, "img_size": 32, "patch_size": 8}
N = 6
ATOL = 1e-10          # float64 throughout; observed differences are ~1e-14


def _vit(config: ViTConfig = SMALL, seed: int = 0) -> MultiModalViT:
    """The same float64 weights on every call."""
    torch.manual_seed(seed)
    return MultiModalViT(config).double()


def _batch(config: ViTConfig = SMALL, n: int = N, seed: int = 1) -> dict[str, Tensor]:
    """Random studies, some with absent sequences (zeroed and masked, as StudyDataset does)."""
    g = torch.Generator().manual_seed(seed)
    present = torch.ones(n, config.num_sequences, dtype=torch.bool)
    present[0, 1] = False
    present[2, [0, 3]] = False
    present[n - 1, 2] = False
    image = torch.randn(n, config.num_sequences, config.img_size, config.img_size, generator=g,
                        dtype=torch.float64)
    return {"image": image * present[..., None, None], "present": present,
            "label": torch.randint(0, 3, (n,), generator=g)}


def _summed_loss(model: nn.Module, task, batch: dict[str, Tensor]) -> Tensor:
    """What PrivateGradients differentiates: the task's mean loss times n."""
    out = task.step(model, batch)
    return out.loss * out.n


def _clipper_pass(model: nn.Module, task, batch: dict[str, Tensor], max_grad_norm: float,
                  head_share: float | None = None):
    clipper = PerSampleClipper(model, max_grad_norm, head_share)
    with clipper.capture():
        _summed_loss(model, task, batch).backward()
    return clipper


def _reference_clipped_sum(per_sample: list[list[Tensor]], max_grad_norm: float) -> list[Tensor]:
    """``sum_i min(1, C / (||g_i|| + 1e-6)) g_i`` from materialised per-sample gradients."""
    norms = torch.stack([torch.sqrt(sum(g.square().sum() for g in grads)) for grads in per_sample])
    factors = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    return [sum(f * grads[j] for f, grads in zip(factors, per_sample))
            for j in range(len(per_sample[0]))]


@pytest.fixture(scope="module")
def task():
    return TASKS.build("classification", {})


@pytest.fixture(scope="module", params=["direct", "ghost"])
def reference(task, request):
    """Per-sample gradients (parameter order of ``_vit()``) from one backward pass per sample,
    for a model whose Linear norms take each path."""
    config = {"direct": SMALL, "ghost": WIDE}[request.param]
    batch = _batch(config)
    per_sample, norms = _one_by_one(_vit(config), task, batch)
    return {"batch": batch, "per_sample": per_sample, "norms": norms, "config": config,
            "path": request.param}


def _one_by_one(model: nn.Module, task, batch: dict[str, Tensor]
                ) -> tuple[list[list[Tensor]], Tensor]:
    """Each sample's gradient (parameter order of ``model``) from a backward pass of its own,
    and the norms of those gradients."""
    params = list(model.parameters())
    per_sample = []
    for i in range(len(batch["label"])):
        model.zero_grad(set_to_none=True)
        _summed_loss(model, task, {k: v[i:i + 1] for k, v in batch.items()}).backward()
        per_sample.append([torch.zeros_like(p) if p.grad is None else p.grad.clone()
                           for p in params])
    norms = torch.stack([torch.sqrt(sum(g.square().sum() for g in grads)) for grads in per_sample])
    return per_sample, norms


# ---------------------------------------------------------------- per-sample clipping (exact)

def test_per_sample_norms_equal_individual_backward_passes(task, reference, monkeypatch):
    import client.privacy.persample as persample

    batch = reference["batch"]
    assert not batch["present"].all(), "the batch must exercise absent sequences"
    model = _vit(reference["config"])
    grams = []
    monkeypatch.setattr(persample, "_gram", lambda x: grams.append(x.shape) or x @ x.mT)
    clipper = _clipper_pass(model, task, batch, max_grad_norm=1.0)
    linears = sum(isinstance(m, nn.Linear) for m in model.modules())
    if reference["path"] == "ghost":      # input and output Gram of every Linear but the head
        assert len(grams) == 2 * (linears - 1)
    else:
        assert grams == []
    norms = clipper.per_sample_norms()
    assert norms.shape == (N,) and norms.dtype == torch.float64
    assert len(set(reference["norms"].tolist())) == N      # distinct: a mix-up would show
    torch.testing.assert_close(norms, reference["norms"], rtol=0, atol=ATOL)


def test_clipped_sum_equals_sum_of_individually_clipped_gradients(task, reference):
    norms = reference["norms"]
    c = float(norms.median())                      # some samples clipped, some not
    assert (norms > c).any() and (norms < c).any()
    model = _vit(reference["config"])
    params = list(model.parameters())
    clipper = _clipper_pass(model, task, reference["batch"], max_grad_norm=c)
    # the pass itself never writes an (unclipped) gradient and gives requires_grad back
    assert all(p.grad is None and p.requires_grad for p in params)
    grads, got_norms = clipper.clipped_sum()
    assert set(grads) == set(params)
    torch.testing.assert_close(got_norms, norms, rtol=0, atol=ATOL)
    for p, expected in zip(params, _reference_clipped_sum(reference["per_sample"], c)):
        assert grads[p].shape == p.shape and grads[p].dtype == p.dtype
        torch.testing.assert_close(grads[p], expected, rtol=0, atol=ATOL)


def test_per_group_clipping_clips_the_head_and_the_rest_each_to_its_own_bound(task, reference):
    """``head_share``: the head's part of g_i clipped to C sqrt(s), the rest to C sqrt(1 - s),
    against the definition on materialised per-sample gradients."""
    names = [n for n, _ in _vit(reference["config"]).named_parameters()]
    in_head = [n.startswith("head.") for n in names]
    assert any(in_head) and not all(in_head)
    part = {h: torch.stack([torch.sqrt(sum(g.square().sum() for g, x in zip(grads, in_head)
                                           if x == h)) for grads in reference["per_sample"]])
            for h in (False, True)}
    # Each group's bound at its median part: in both, some samples clipped and some not.
    c = float(part[False].median() ** 2 + part[True].median() ** 2) ** 0.5
    share = float(part[True].median()) ** 2 / c ** 2
    bound = {False: c * (1 - share) ** 0.5, True: c * share ** 0.5}
    assert all((part[h] > bound[h] * 1.001).any() and (part[h] < bound[h] * 0.999).any()
               for h in part), "both groups must be clipped for some samples, not all"
    factor = {h: (bound[h] / (part[h] + 1e-6)).clamp(max=1.0) for h in part}
    model = _vit(reference["config"])
    params = list(model.parameters())
    grads, norms = _clipper_pass(model, task, reference["batch"], c, head_share=share
                                 ).clipped_sum()
    torch.testing.assert_close(norms, reference["norms"], rtol=0, atol=ATOL)
    for j, (p, h) in enumerate(zip(params, in_head)):
        expected = sum(f * grads_i[j] for f, grads_i in zip(factor[h], reference["per_sample"]))
        torch.testing.assert_close(grads[p], expected, rtol=0, atol=ATOL, msg=names[j])


@pytest.mark.parametrize("share", [0.01, 0.5, 0.99])
def test_any_head_share_keeps_each_samples_clipped_gradient_within_c(task, reference, share):
    """The split is the coordinator's to ask: whatever it is, one sample's contribution has
    norm <= C, the sensitivity the noise sigma C and the accountant assume."""
    c = float(reference["norms"].min()) / 4                # every sample clipped hard
    for i in range(N):
        one = {k: v[i:i + 1] for k, v in reference["batch"].items()}
        grads, _ = _clipper_pass(_vit(reference["config"]), task, one, c, share).clipped_sum()
        total = torch.sqrt(sum(g.square().sum() for g in grads.values()))
        assert total <= c * (1 + 1e-9)
        assert total >= c * 0.99 * min(share, 1 - share) ** 0.5   # neither part vanished


def test_per_group_clipping_needs_a_head_and_something_besides_it():
    model = _vit()
    with pytest.raises(ValueError, match=r"head_clip_share must be in \(0, 1\), got 1"):
        PerSampleClipper(model, 1.0, head_share=1.0)
    probe = _vit().requires_grad_(False)
    probe.head.requires_grad_(True)
    with pytest.raises(ValueError, match="this model trains only its class head"):
        PerSampleClipper(probe, 1.0, head_share=0.5)
    with pytest.raises(ValueError, match="this model trains only its class head"):   # DP-SGD's
        PrivateGradients(probe, DPSGDConfig(noise_multiplier=1.0, max_grad_norm=1.0,
                                            sample_rate=0.5, head_clip_share=0.5), 1.0)
    headless = _vit()
    headless.head.requires_grad_(False)
    with pytest.raises(ValueError, match="this model trains no class head"):
        PerSampleClipper(headless, 1.0, head_share=0.5)
    with pytest.raises(ValueError, match=r"head_clip_share must be in \(0, 1\)"):
        DPSGDConfig(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.5,
                    head_clip_share=0.0)


def test_summed_per_sample_gradients_equal_the_batch_gradient(task, reference):
    model = _vit(reference["config"])
    grads, _ = _clipper_pass(model, task, reference["batch"], max_grad_norm=1e12).clipped_sum()
    model.zero_grad(set_to_none=True)
    _summed_loss(model, task, reference["batch"]).backward()     # ordinary batch gradient
    for name, p in model.named_parameters():
        assert p.grad.abs().max() > 0, name
        torch.testing.assert_close(grads[p], p.grad, rtol=0, atol=ATOL, msg=name)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_clipped_sum_equals_opacus_hooks_mode(task, reference):
    """Opacus' GradSampleModule materialises every g_i (TokenEmbedding via functorch)."""
    from opacus import GradSampleModule

    c = float(reference["norms"].median())
    model = _vit(reference["config"])
    params = list(model.parameters())
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    try:
        _summed_loss(gsm, task, reference["batch"]).backward()
        per_sample = [p.grad_sample.detach().clone() for p in params]
    finally:
        gsm._close()                                          # hooks and grad_sample removed
    opacus_norms = torch.sqrt(sum(g.reshape(N, -1).square().sum(1) for g in per_sample))
    factors = (c / (opacus_norms + 1e-6)).clamp(max=1.0)
    opacus_sum = [torch.einsum("b,b...->...", factors, g) for g in per_sample]

    model.zero_grad(set_to_none=True)
    grads, norms = _clipper_pass(model, task, reference["batch"], max_grad_norm=c).clipped_sum()
    torch.testing.assert_close(norms, opacus_norms, rtol=0, atol=ATOL)
    for p, expected in zip(params, opacus_sum):
        torch.testing.assert_close(grads[p], expected, rtol=0, atol=ATOL)


@pytest.mark.parametrize("layer, kind", [
    (nn.BatchNorm1d(4), "BatchNorm1d"), (nn.Embedding(4, 4), "Embedding"),
    (nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular"), "padding_mode='circular'.*")])
def test_unsupported_trainable_layers_are_refused_by_name(layer, kind):
    model = _vit()
    model.extra = layer
    with pytest.raises(UnsupportedLayerError, match=rf"extra \({kind}\)"):
        PerSampleClipper(model, 1.0)
    with pytest.raises(UnsupportedLayerError, match=rf"<root> \({kind}\)"):
        PerSampleClipper(layer, 1.0)


def test_frozen_unsupported_layers_and_bad_bound():
    model = _vit()
    model.extra = nn.Conv2d(4, 4, 3).requires_grad_(False)   # no trainable params: nothing to clip
    assert set(PerSampleClipper(model, 1.0).parameters()) == {
        p for p in model.parameters() if p.requires_grad}
    with pytest.raises(ValueError, match="max_grad_norm must be > 0"):
        PerSampleClipper(model, 0.0)


def test_a_layer_used_twice_in_one_forward_is_refused():
    lin = nn.Linear(3, 3).double()
    clipper = PerSampleClipper(lin, 1.0)
    with pytest.raises(UnsupportedLayerError, match="called twice"):
        with clipper.capture():
            lin(lin(torch.randn(2, 3, dtype=torch.float64))).sum().backward()
    assert lin.weight.requires_grad and lin.bias.requires_grad     # restored on the way out


def _individual(model: nn.Module, x: Tensor) -> tuple[list[list[Tensor]], Tensor]:
    """Per-sample gradients of ``model(x).sum()`` over its trainable params, and their norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    per_sample = []
    for i in range(len(x)):
        model.zero_grad(set_to_none=True)
        model(x[i:i + 1]).sum().backward()
        per_sample.append([p.grad.clone() for p in params])
    model.zero_grad(set_to_none=True)
    norms = torch.stack([torch.sqrt(sum(g.square().sum() for g in grads)) for grads in per_sample])
    return per_sample, norms


class _TiedLinears(nn.Module):
    """Two Linear modules sharing one weight (weight tying, as in tied embeddings/heads)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False)
        self.b.weight = self.a.weight

    def forward(self, x: Tensor) -> Tensor:
        return self.b(torch.tanh(self.a(x)))


def test_a_parameter_shared_by_two_modules_is_clipped_exactly_or_refused():
    torch.manual_seed(0)
    model = _TiedLinears().double()
    x = torch.randn(5, 4, dtype=torch.float64)
    per_sample, norms = _individual(model, x)
    try:
        clipper = PerSampleClipper(model, 1.0)
    except UnsupportedLayerError:
        return                                  # refusing shared parameters is a valid fix
    with clipper.capture():
        model(x).sum().backward()
    grads, got = clipper.clipped_sum()
    assert torch.allclose(got, norms, atol=1e-10), (
        "BUG persample.py: a parameter shared by two Linear modules gets per-sample norm "
        "sqrt(||g_a||^2 + ||g_b||^2) instead of ||g_a + g_b||, which can be smaller than the "
        f"true norm, so clipping does not bound it by C: got {got.tolist()}, "
        f"true {norms.tolist()}")
    expected = _reference_clipped_sum(per_sample, 1.0)[0]
    assert torch.allclose(grads[model.a.weight], expected, atol=1e-10), (
        "BUG persample.py clipped_sum: the shared parameter keeps only the last module's "
        "contribution (grads[param] is overwritten per layer)")


def test_linear_with_frozen_weight_and_trainable_bias():
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()
    model.weight.requires_grad_(False)                          # e.g. bias-only fine-tuning
    x = torch.randn(5, 4, dtype=torch.float64)
    per_sample, norms = _individual(model, x)
    clipper = PerSampleClipper(model, 1.0)
    with clipper.capture():
        model(x).sum().backward()
    got = clipper.per_sample_norms()
    assert torch.allclose(got, norms, atol=1e-10), (
        "BUG persample.py _linear_norms: the frozen weight's gradient is counted in the "
        f"per-sample norm (over-clips the trainable bias): got {got.tolist()}, "
        f"true {norms.tolist()}")
    try:
        grads, _ = clipper.clipped_sum()
    except KeyError as err:
        pytest.fail("BUG persample.py _linear_grads: returns a 'weight' gradient for a frozen "
                    f"weight, clipped_sum then fails with KeyError {err}")
    torch.testing.assert_close(grads[model.bias], _reference_clipped_sum(per_sample, 1.0)[0])


def test_layernorm_over_several_dims_is_exact_or_refused():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.Unflatten(1, (2, 4)), nn.LayerNorm((2, 4)),
                          nn.Flatten(), nn.Linear(8, 1)).double()
    with torch.no_grad():
        model[2].weight.uniform_(0.5, 1.5)
        model[2].bias.uniform_(-1.0, 1.0)
    x = torch.randn(5, 8, dtype=torch.float64)
    per_sample, norms = _individual(model, x)
    try:
        clipper = PerSampleClipper(model, 1.0)
    except UnsupportedLayerError:
        return                                  # refusing multi-dim normalized_shape is fine
    with clipper.capture():
        model(x).sum().backward()
    got = clipper.per_sample_norms()
    assert torch.allclose(got, norms, atol=1e-10), (
        "BUG persample.py _layernorm_per_sample: for LayerNorm(normalized_shape=(2, 4)) the "
        "per-sample weight/bias gradients are summed over all but the last dim (shape [B, 4] "
        f"instead of [B, 2, 4]): norms {got.tolist()} vs true {norms.tolist()}")


# ---------------------------------------------------------------- noise and PrivateGradients

def _private_grads(model: nn.Module, task, batch, config: DPSGDConfig, expected: float):
    private = PrivateGradients(model, config, expected)
    out = private.backward(lambda: None if batch is None else task.step(model, batch))
    return out, {p: p.grad.detach().clone() for p in model.parameters()}


def test_private_gradient_is_clipped_sum_plus_seeded_noise_over_expected_batch(task, reference):
    c, sigma, seed, expected = float(reference["norms"].median()), 0.8, 3, 4.5
    config = DPSGDConfig(noise_multiplier=sigma, max_grad_norm=c, sample_rate=0.5,
                         secure_mode=False, seed=seed)
    model = _vit(reference["config"])
    out, grads = _private_grads(model, task, reference["batch"], config, expected)
    assert out.n == N
    clipped = _reference_clipped_sum(reference["per_sample"], c)
    noise = GaussianNoise(secure=False, seed=seed)
    residuals = []
    for p, clip_sum in zip(model.parameters(), clipped):
        # the noise is drawn per parameter in parameter order: reproduce it exactly
        want = (clip_sum + noise.sample(p.shape, sigma * c, dtype=p.dtype)) / expected
        torch.testing.assert_close(grads[p], want, rtol=0, atol=ATOL)
        residuals.append((grads[p] * expected - clip_sum).flatten())
    largest = max(residuals, key=len)
    assert largest.numel() >= 3000
    assert abs(float(largest.std()) / (sigma * c) - 1) < 0.05
    pooled = torch.cat(residuals)
    assert abs(float(pooled.std()) / (sigma * c) - 1) < 0.03
    assert abs(float(pooled.mean())) < 5 * sigma * c / pooled.numel() ** 0.5


def test_a_poisson_batch_in_physical_chunks_gets_the_same_private_gradient(task, reference):
    """The engine runs a Poisson batch in chunks of at most the job's batch size (the memory
    the site's size check counted, whatever sample rate the coordinator chose): the chunks'
    clipped sums add up to the whole batch's, with the same noise and step output."""
    c, seed, expected = float(reference["norms"].median()), 3, 4.5
    config = DPSGDConfig(noise_multiplier=0.8, max_grad_norm=c, sample_rate=0.5,
                         secure_mode=False, seed=seed)
    batch = reference["batch"]
    whole, grads = _private_grads(_vit(reference["config"]), task, batch, config, expected)
    model = _vit(reference["config"])
    cuts = [0, N - 2, N - 1, N]                      # uneven chunks: weighted by their n
    chunks = [{k: v[a:b] for k, v in batch.items()} for a, b in zip(cuts, cuts[1:])]
    assert [len(c["label"]) for c in chunks] == [N - 2, 1, 1]
    out = PrivateGradients(model, config, expected).backward(
        [lambda chunk=chunk: task.step(model, chunk) for chunk in chunks])
    assert out.n == whole.n == N
    torch.testing.assert_close(out.loss, whole.loss.detach(), rtol=0, atol=ATOL)
    for p, q in zip(model.parameters(), grads):
        torch.testing.assert_close(p.grad, grads[q], rtol=0, atol=ATOL)


# ---------------------------------------------------------------- augmentation multiplicity

K = 3


def _views(batch: dict[str, Tensor], k: int = K) -> dict[str, Tensor]:
    """Each study as ``k`` consecutive rows: itself, flipped, rotated (what the dataset's
    augmentation gives), its label and present sequences repeated."""
    image = batch["image"]
    views = [image, image.flip(-1), image.rot90(1, (-2, -1))][:k]
    return {"image": torch.stack(views, 1).flatten(0, 1),
            "present": batch["present"].repeat_interleave(k, 0),
            "label": batch["label"].repeat_interleave(k, 0)}


def _mean_over_views(model: nn.Module, task, rows: dict[str, Tensor], k: int = K
                     ) -> tuple[list[list[Tensor]], Tensor]:
    """The definition: sample i's gradient is that of the mean loss over its k rows, one
    backward pass per sample; and the norms of those gradients."""
    params = list(model.parameters())
    per_sample = []
    for i in range(len(rows["label"]) // k):
        model.zero_grad(set_to_none=True)
        (_summed_loss(model, task, {n: v[i * k:(i + 1) * k] for n, v in rows.items()})
         / k).backward()
        per_sample.append([p.grad.clone() for p in params])
    model.zero_grad(set_to_none=True)
    norms = torch.stack([torch.sqrt(sum(g.square().sum() for g in grads)) for grads in per_sample])
    return per_sample, norms


def test_augmentation_multiplicity_clips_each_samples_mean_over_its_views(task, reference):
    """k views of a sample are one sample: its gradient (the mean over its views) is clipped
    as one, so the privatised sum is ``sum_i clip(mean_v g_iv)`` over the N samples - not
    N*k rows clipped one by one (k times the sensitivity)."""
    rows = _views(reference["batch"])
    model = _vit(reference["config"])
    per_sample, norms = _mean_over_views(model, task, rows)
    assert len(per_sample) == N and len(set(norms.tolist())) == N
    c = float(norms.median())                      # some samples clipped, some not
    assert (norms > c).any() and (norms < c).any()
    clipper = PerSampleClipper(model, c)
    with clipper.capture(views=K):
        (_summed_loss(model, task, rows) / K).backward()
    torch.testing.assert_close(clipper.per_sample_norms(), norms, rtol=0, atol=ATOL)
    config = DPSGDConfig(noise_multiplier=0.0, allow_no_noise=True, max_grad_norm=c,
                         sample_rate=0.5, secure_mode=False, augmentation_multiplicity=K)
    out, grads = _private_grads(model, task, rows, config, expected=2.0)
    assert out.n == N * K
    for p, want in zip(model.parameters(), _reference_clipped_sum(per_sample, c)):
        torch.testing.assert_close(grads[p], want / 2.0, rtol=0, atol=ATOL)


def test_one_study_moves_the_clipped_sum_by_at_most_c_however_many_views_it_has(task):
    """The attacker's measure of sensitivity: add one study whose k views all have huge
    gradients to a batch; the clipped sum moves by at most C (it is one sample), not by up to
    k C (its k rows clipped as k samples)."""
    model = _vit()
    studies = _batch(n=6)
    base = _views({n: v[:5] for n, v in studies.items()})
    study = _views({n: v[5:] for n, v in studies.items()})
    study["image"] = study["image"] * 50

    def clipped(rows):
        clipper = PerSampleClipper(model, 1.0)
        with clipper.capture(views=K):
            (_summed_loss(model, task, rows) / K).backward()
        grads, norms = clipper.clipped_sum()
        return torch.cat([grads[p].flatten() for p in model.parameters()]), norms
    without, _ = clipped(base)
    with_study, norms = clipped({n: torch.cat([base[n], study[n]]) for n in base})
    assert norms[-1] > 10                           # its own gradient is far above C
    moved = float((with_study - without).norm())
    assert 0.999 < moved <= 1.0 + 1e-9


def test_rows_that_are_not_whole_groups_of_views_are_refused(task):
    model = _vit()
    clipper = PerSampleClipper(model, 1.0)
    rows = _views(_batch(n=5), k=2)                      # 10 rows, not 4 views per sample
    with pytest.raises(ValueError, match="10 rows are not whole groups of 4 views per sample"):
        with clipper.capture(views=4):
            _summed_loss(model, task, rows).backward()
    for views in (0, 1.5, True):
        with pytest.raises(ValueError, match="views must be an integer >= 1"):
            with clipper.capture(views=views):
                pass
    with pytest.raises(ValueError, match="augmentation_multiplicity must be an integer >= 1"):
        DPSGDConfig(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.5,
                    augmentation_multiplicity=0)
    with pytest.raises(ValueError, match="steps must be >= 1"):     # the audit's exact steps
        DPSGDConfig(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.5, steps=0)


def test_seeded_runs_are_reproducible_and_secure_runs_are_not(task, reference):
    def run(**kw):
        cfg = DPSGDConfig(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.5, **kw)
        return _private_grads(_vit(reference["config"]), task, reference["batch"], cfg, 3.0)[1]

    def same(a, b):
        return all(torch.equal(x, y) for x, y in zip(a.values(), b.values()))

    assert same(run(secure_mode=False, seed=11), run(secure_mode=False, seed=11))
    assert not same(run(secure_mode=False, seed=11), run(secure_mode=False, seed=12))
    assert not same(run(), run())                 # default: CSPRNG keyed from os.urandom


def test_empty_batch_takes_a_pure_noise_step(task):
    sigma, c, seed, expected = 1.5, 2.0, 5, 3.0
    config = DPSGDConfig(noise_multiplier=sigma, max_grad_norm=c, sample_rate=0.25,
                         secure_mode=False, seed=seed)
    model = _vit()
    out, grads = _private_grads(model, task, None, config, expected)
    assert out is None
    noise = GaussianNoise(secure=False, seed=seed)
    for p in model.parameters():
        want = noise.sample(p.shape, sigma * c, dtype=p.dtype) / expected
        torch.testing.assert_close(grads[p], want, rtol=0, atol=ATOL)
        assert p.requires_grad
    pooled = torch.cat([g.flatten() for g in grads.values()]) * expected
    assert abs(float(pooled.std()) / (sigma * c) - 1) < 0.03


@pytest.mark.parametrize("changes", [{"noise_multiplier": 0.0}, {"noise_multiplier": -1.0},
                                     {"max_grad_norm": 0.0}, {"sample_rate": 0.0},
                                     {"sample_rate": 1.5}])
def test_dpsgd_config_refuses_out_of_range_values(changes):
    with pytest.raises(ValueError, match=next(iter(changes))):
        DPSGDConfig(**({"noise_multiplier": 1.0, "max_grad_norm": 1.0, "sample_rate": 0.1}
                       | changes))


def test_secure_noise_has_the_requested_distribution():
    n, std = 1_000_000, 2.5
    z = GaussianNoise(secure=True).sample((n,), std, dtype=torch.float64)
    assert z.shape == (n,) and z.dtype == torch.float64
    assert abs(float(z.mean())) < 5 * std / n ** 0.5
    assert abs(float(z.std()) / std - 1) < 0.01
    inside = float((z.abs() < std).double().mean())          # Gaussian: 68.27% within 1 sd
    assert abs(inside - 0.6827) < 0.003


def test_secure_noise_is_four_box_muller_normals_from_the_aes_ctr_keystream():
    """Pins the generator to an independent float64 computation from the same keystream."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    from client.privacy.noise import _PIECE, _SecureNormals

    key, nonce, n, std = bytes(range(16)), bytes(range(16, 32)), _PIECE + 1000, 3.0
    got = np.empty(n, np.float32)
    _SecureNormals(key, nonce).fill(got, std)
    aes = Cipher(algorithms.AES(key), modes.CTR(nonce)).encryptor()
    pieces = []
    for start in range(0, n, _PIECE):                    # each piece: 4 rows of k words
        k = min(_PIECE, n - start)
        w = np.frombuffer(aes.update(bytes(16 * k)), np.uint32).reshape(4, k) >> 8
        r = np.sqrt(-2 * np.log((w[0::2] + 1.0) / 2 ** 24))
        a = 2 * np.pi * w[1::2] / 2 ** 24
        pieces.append(std * (r * np.cos(a) + r * np.sin(a)).sum(0) / 2)
    np.testing.assert_allclose(got, np.concatenate(pieces), rtol=0, atol=5e-5 * std)
    added = np.ones(n, np.float32)
    _SecureNormals(key, nonce).fill(added, std, add=True)
    np.testing.assert_allclose(added, got + 1, rtol=0, atol=1e-6 * std)


def test_secure_noise_matches_the_normal_cdf():
    from scipy import stats

    z = GaussianNoise(secure=True).sample((1_000_000,), 1.0, dtype=torch.float64).numpy()
    assert stats.kstest(z, "norm").statistic < 0.0025         # p ~ 1e-5 under H0
    for k, tail in ((2, 0.0455), (3, 0.0027)):                 # two-sided tail masses
        assert abs(float((np.abs(z) > k).mean()) - tail) < 4 * (tail / 1e6) ** 0.5


def test_secure_noise_add_in_place_and_fallbacks():
    noise = GaussianNoise()
    x = torch.full((3, 5000), 2.0)
    assert noise.add_(x, 1.0) is x
    assert abs(float(x.mean()) - 2) < 0.1 and abs(float(x.std()) - 1) < 0.05
    strided = torch.zeros(5000, 4).t()                         # not contiguous: falls back
    noise.add_(strided, 1.0)
    assert abs(float(strided.std()) - 1) < 0.05
    same = torch.ones(4, dtype=torch.float64)
    assert torch.equal(noise.add_(same, 0.0), torch.ones(4, dtype=torch.float64))


def test_secure_noise_instances_differ_and_honour_shape_dtype_device():
    a, b = GaussianNoise(), GaussianNoise()
    assert a.secure
    assert not torch.equal(a.sample((1000,), 1.0), b.sample((1000,), 1.0))
    x = a.sample(torch.Size([3, 4, 5]), 1.0, device="cpu", dtype=torch.bfloat16)
    assert x.shape == (3, 4, 5) and x.dtype == torch.bfloat16 and x.device.type == "cpu"
    assert x.float().abs().sum() > 0
    assert torch.equal(a.sample((2, 3), 0.0, dtype=torch.float64),
                       torch.zeros(2, 3, dtype=torch.float64))
    assert a.sample((0, 3), 1.0).shape == (0, 3)
    if torch.cuda.is_available():
        assert a.sample((4,), 1.0, device="cuda").device.type == "cuda"


def test_seeded_noise_is_reproducible():
    def draw(seed):
        return GaussianNoise(secure=False, seed=seed).sample((100,), 1.0)

    assert torch.equal(draw(1), draw(1)) and not torch.equal(draw(1), draw(2))


# ---------------------------------------------------------------- Poisson sampling

def test_poisson_batches_include_each_sample_with_probability_q():
    n, q, steps = 2000, 0.05, 100
    batches = list(poisson_batches(n, q, steps, secure=True))
    assert len(batches) == steps
    for idx in batches:
        assert np.all(np.diff(idx) > 0) and (len(idx) == 0 or (idx[0] >= 0 and idx[-1] < n))
    sizes = np.array([len(idx) for idx in batches])
    rate = sizes.sum() / (n * steps)
    assert abs(rate - q) < 4 * (q * (1 - q) / (n * steps)) ** 0.5
    # sizes vary like Binomial(n, q) (sd ~9.7), not a fixed batch size
    assert 7 < sizes.std() < 13
    # independent across samples and steps: each count ~ Binomial(steps, q), variance 4.75
    counts = np.bincount(np.concatenate(batches), minlength=n)
    assert 4.0 < counts.var() < 5.5


def test_poisson_batches_seeding_and_step_count():
    def draw(**kw):
        return [idx.tolist() for idx in poisson_batches(50, 0.3, 7, **kw)]

    assert draw(secure=False, seed=4) == draw(secure=False, seed=4)
    assert draw(secure=False, seed=4) != draw(secure=False, seed=5)
    assert draw(secure=True) != draw(secure=True)
    assert len(draw(secure=True)) == 7
    assert list(poisson_batches(50, 0.3, 0, secure=True)) == []
    assert all(idx.tolist() == list(range(5)) for idx in poisson_batches(5, 1.0, 3, secure=True))


@pytest.mark.parametrize("q, steps", [(0.25, 4), (0.3, 3), (1.0, 1), (0.6, 1), (0.07, 14)])
def test_steps_per_epoch_is_opacus_int_one_over_q(q, steps):
    assert steps_per_epoch(q) == steps


# ---------------------------------------------------------------- the engine with DP-SGD

@pytest.fixture(scope="module")
def site_train(tiny_sites):
    data = load_site(tiny_sites / "site-0", CLASSES)
    return StudyDataset(data.split("train", labelled_only=True), image_size=32)


def _fit(data, privacy: DPSGDConfig, *, model=None, seed=5):
    torch.manual_seed(0)
    model = model if model is not None else MODELS.build("mmvit", TINY_OPTIONS)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    engine = Engine(TASKS.build("classification", {}), torch.device("cpu"))
    metrics = engine.fit(model, data, TrainConfig(local_epochs=2, batch_size=4, lr=1e-3,
                                                  seed=seed), privacy=privacy)
    return model, before, metrics


def test_engine_runs_local_epochs_times_one_over_q_private_steps(site_train):
    assert len(site_train) >= 4
    privacy = DPSGDConfig(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.25)
    model, before, metrics = _fit(site_train, privacy)
    assert metrics["steps"] == 2 * 4
    assert np.isfinite(metrics["train_loss"])
    after = model.state_dict()
    # noise reaches every trainable parameter, so every one of them moves
    moved = [k for k, p in model.named_parameters() if not torch.equal(before[k], after[k])]
    assert moved == [k for k, _ in model.named_parameters()]


def test_engine_private_training_is_reproducible_in_test_mode(site_train):
    privacy = DPSGDConfig(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.5,
                          secure_mode=False, seed=2)
    a, _, ma = _fit(site_train, privacy)
    b, _, mb = _fit(site_train, privacy)
    assert ma["steps"] == mb["steps"] == 2 * 2
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(),
                                                 b.state_dict().values()))
    c, _, _ = _fit(site_train, privacy, seed=6)              # other Poisson draws
    assert not all(torch.equal(x, y) for x, y in zip(a.state_dict().values(),
                                                     c.state_dict().values()))


class _Marked(torch.utils.data.Dataset):
    """A site's studies with each image filled with its index; every read counted."""

    def __init__(self, base):
        self.base, self.reads = base, [0] * len(base)

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        self.reads[i] += 1
        item = dict(self.base[i])
        return item | {"image": torch.full_like(item["image"], float(i))}


def test_engine_reads_each_drawn_sample_k_times_as_consecutive_rows(site_train):
    """Augmentation multiplicity at the engine: every drawn study is read k times (each read
    draws the dataset's augmentation afresh) and its rows are consecutive, the grouping the
    clipper assumes (rows interleaved across studies would clip mixtures of studies as one)."""
    data, rows = _Marked(site_train), []
    torch.manual_seed(0)
    model = MODELS.build("mmvit", TINY_OPTIONS)
    model.register_forward_pre_hook(lambda m, args: rows.append(args[0][:, 0, 0, 0].tolist()))
    privacy = DPSGDConfig(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=1.0,
                          secure_mode=False, augmentation_multiplicity=3)
    _, _, metrics = _fit(data, privacy, model=model)
    n = len(data)
    assert metrics["steps"] == 2 and np.isfinite(metrics["train_loss"])
    assert data.reads == [2 * 3] * n                    # q = 1: every study, each step
    # in balanced physical chunks of at most batch_size = 4 studies (x 3 rows), each study's
    # rows in one chunk
    chunks = -(-n // 4)
    assert n > 4 and [len(r) for r in rows] == \
        [3 * (n // chunks + (i < n % chunks)) for i in range(chunks)] * 2
    assert sum(rows, []) == [float(i) for i in range(n) for _ in range(3)] * 2


def test_engine_refuses_private_training_of_an_unsupported_layer(site_train):
    torch.manual_seed(0)
    model = MODELS.build("mmvit", TINY_OPTIONS)
    model.extra = nn.BatchNorm2d(4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    privacy = DPSGDConfig(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.25)
    with pytest.raises(UnsupportedLayerError, match=r"extra \(BatchNorm2d\)"):
        _fit(site_train, privacy, model=model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_task_loss_is_a_mean_of_per_sample_terms(task, reference):
    """What makes ``loss * n`` the sum of per-sample losses (the task's batch_coupling=None)."""
    model, batch = _vit(reference["config"]), reference["batch"]
    out = task.step(model, batch)
    logits = model(batch["image"], batch["present"]).float()
    per = F.cross_entropy(logits, batch["label"], reduction="none")
    assert type(task).batch_coupling is None
    torch.testing.assert_close(out.loss * out.n, per.sum())


@pytest.mark.parametrize("config", [SMALL, WIDE], ids=["direct", "ghost"])
def test_pseudo_labelled_batch_per_sample_gradients_are_exact(config):
    """Self-training under DP-SGD (``pseudo_label_threshold``): a batch mixing true labels,
    pseudo-labels (weight 0.5) and studies left without a label (weight 0). Each sample's
    clipped gradient is its own one-sample gradient; one without a label contributes none."""
    task = TASKS.build("classification", {"pseudo_label_threshold": 0.9,
                                          "pseudo_label_weight": 0.5})
    batch = _batch(config) | {"label": torch.tensor([0, -1, 2, 1, -1, 2]),
                              "label_weight": torch.tensor([1.0, 0.0, 0.5, 1.0, 0.0, 0.5],
                                                           dtype=torch.float64)}
    model = _vit(config)
    params = list(model.parameters())
    per_sample, norms = _one_by_one(model, task, batch)
    assert norms[[1, 4]].tolist() == [0.0, 0.0] and (norms[[0, 2, 3, 5]] > 0).all()
    c = float(norms[[0, 2, 3, 5]].median())
    clipper = _clipper_pass(model, task, batch, max_grad_norm=c)
    torch.testing.assert_close(clipper.per_sample_norms(), norms, rtol=0, atol=ATOL)
    got, _ = clipper.clipped_sum()
    want = _reference_clipped_sum(per_sample, c)
    for p, w in zip(params, want):
        torch.testing.assert_close(got[p], w, rtol=0, atol=ATOL)
