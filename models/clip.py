"""Image-report CLIP: the multi-modal ViT as image tower, a BERT as text tower.

Each study's images and its radiology report are embedded into one space; the symmetric
InfoNCE loss (CLIP, ConVIRT) pulls a study's image and report embeddings together and pushes
them away from the other studies of the batch, at a learnable temperature. Studies without a
report (``has_report`` False) are left out of the loss.

The text tower is a ``transformers`` ``BertModel`` built from a ``BertConfig`` (never a hub
checkpoint). The tokenizer (``models.text``) is part of the model definition: the shipped
default vocabulary or a local tokenizer directory, identical at every site.

Not DP-SGD ready (``batch_coupling``): InfoNCE normalises every sample's similarity over the
other samples of its batch. Use site-level DP for this objective.

Evaluation reports, within the evaluated set: the InfoNCE loss, image->report and
report->image recall@1/@5, and zero-shot macro AUROC (``auroc``) - class probabilities are
the softmax over the similarities of the image to one text prompt per class name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .metrics import RECALL_FIGURES, SplitMetrics, macro_auroc
from .registry import TASKS
from .task import DataNeeds, ReportText, StepOutput, TaskBase, TaskModel
from .text import (load_tokenizer, pad_id, shipped_tokenizer, tokenize, tokenizer_fingerprint,
                   vocab_size)
from .vit import MultiModalViT, _init_weights

# Options that only describe the from-scratch text tower and its projections.
BERT_OPTIONS = ("embed_dim", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                "text_dropout", "vocab_size", "temperature", "max_logit_scale")


@dataclass(frozen=True)
class CLIPConfig:
    num_classes: int = 3                 # classes of the zero-shot evaluation
    class_names: tuple[str, ...] = ()    # zero-shot prompt words; empty = no zero-shot AUROC
    prompt_template: str = "findings consistent with {}"
    embed_dim: int = 128                 # shared image-report embedding
    hidden_size: int = 128               # text tower (BERT)
    num_layers: int = 2
    num_heads: int = 4
    intermediate_size: int = 512
    text_dropout: float = 0.1
    vocab_size: int = 693                # must equal the tokenizer's; 693 = shipped default
    max_length: int = 128                # tokens incl. [CLS]/[SEP]; longer reports truncated
    temperature: float = 0.07            # initial softmax temperature (CLIP)
    max_logit_scale: float = 100.0       # CLIP clamps 1/temperature here for stability
    tokenizer_dir: str | None = None     # shipped tokenizer name or sha256; None = default
    tokenizer_sha256: str | None = None  # if set, the tokenizer file must hash to this

    def __post_init__(self):
        # YAML gives lists; a frozen config keeps a tuple.
        object.__setattr__(self, "class_names", tuple(self.class_names))
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")
        if self.class_names and len(self.class_names) != self.num_classes:
            raise ValueError(f"class_names has {len(self.class_names)} entries but num_classes "
                             f"is {self.num_classes}; give one name per class (or none)")
        if "{}" not in self.prompt_template:
            raise ValueError("prompt_template must contain '{}' where the class name goes")
        if min(self.embed_dim, self.hidden_size, self.num_layers, self.num_heads,
               self.intermediate_size) < 1 or self.hidden_size % self.num_heads:
            raise ValueError("text tower sizes must be >= 1 and hidden_size divisible by "
                             f"num_heads (got {self.hidden_size} and {self.num_heads})")
        if self.max_length < 3:
            raise ValueError(f"max_length must be >= 3 tokens, got {self.max_length}")
        if not 0 < self.temperature < 1 or self.max_logit_scale < 1 / self.temperature:
            raise ValueError("temperature must be in (0, 1) and max_logit_scale >= 1/temperature")
        if not 0 <= self.text_dropout < 1:
            raise ValueError(f"text_dropout must be in [0, 1), got {self.text_dropout}")
        directory = shipped_tokenizer(self.tokenizer_dir)   # a path: refused, never read
        tokenizer = load_tokenizer(directory)
        where = self.tokenizer_dir or "the shipped default"
        if vocab_size(tokenizer) != self.vocab_size:
            raise ValueError(f"tokenizer ({where}) has {vocab_size(tokenizer)} tokens but the "
                             f"text tower's vocab_size is {self.vocab_size}; set vocab_size to "
                             f"{vocab_size(tokenizer)} or use the matching tokenizer")
        if self.tokenizer_sha256 and \
                tokenizer_fingerprint(directory) != self.tokenizer_sha256:
            raise ValueError(f"tokenizer ({where}) does not hash to tokenizer_sha256: this site "
                             "would tokenize reports differently from the others")


def clip_loss(logits_per_image: Tensor) -> Tensor:
    """Per-sample symmetric InfoNCE ``[B]``; its mean is Hugging Face's ``clip_loss``.

    ``logits_per_image [B, B]``: scaled similarity of image i to report j; pairs on the
    diagonal. Sample i's term averages its image->report and report->image cross-entropies.
    """
    logits = logits_per_image.float()
    target = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, target, reduction="none")
            + F.cross_entropy(logits.t(), target, reduction="none")) / 2


def recall_at_k(similarity: np.ndarray, k: int) -> float:
    """Fraction of rows whose own column (the diagonal) is among the ``k`` most similar.

    Ties count against the match: a collapsed model whose embeddings are all equal scores 0,
    not 1. An empty set scores 0.
    """
    if similarity.shape[0] == 0:
        return 0.0
    own = np.diag(similarity)[:, None]
    others_at_least_as_close = (similarity >= own).sum(1) - 1          # [N]
    return float((others_at_least_as_close < k).mean())


class CLIPModel(TaskModel):
    """Image tower (``self.backbone``, what fine-tuning keeps), text tower, projections and
    the learnable logit scale; ``forward`` gives the image-report similarity logits."""

    def __init__(self, backbone: MultiModalViT, config: CLIPConfig, pad_token_id: int,
                 image_dim: int | None = None):
        """``image_dim``: the width of ``backbone.pool``'s features; None = ``2 * dim`` of a
        ``MultiModalViT`` (CLS and mean token)."""
        super().__init__()
        from transformers import BertConfig, BertModel   # slow import; only CLIP needs it

        self.config = config
        self.backbone = backbone
        self.text = BertModel(BertConfig(
            vocab_size=config.vocab_size, hidden_size=config.hidden_size,
            num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
            intermediate_size=config.intermediate_size, max_position_embeddings=config.max_length,
            hidden_dropout_prob=config.text_dropout,
            attention_probs_dropout_prob=config.text_dropout,
            type_vocab_size=1, pad_token_id=pad_token_id), add_pooling_layer=False)
        image_dim = 2 * backbone.config.dim if image_dim is None else image_dim
        self.image_projection = nn.Linear(image_dim, config.embed_dim, bias=False)
        self.text_projection = nn.Linear(config.hidden_size, config.embed_dim, bias=False)
        self.image_projection.apply(_init_weights)
        self.text_projection.apply(_init_weights)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / config.temperature)))

    def encode_image(self, images: Tensor, present: Tensor) -> Tensor:
        """``[B, S, *spatial]`` -> unit-norm embeddings ``[B, E]``."""
        pooled = self.backbone.pool(self.backbone.forward_features(images, present), present)
        return F.normalize(self.image_projection(pooled), dim=-1)

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """``[B, L]`` token ids -> unit-norm embeddings ``[B, E]``."""
        hidden = self.text(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        # The first token ([CLS]) as in ConVIRT/BioViL: it attends to the whole report. A mean
        # over tokens trained less stably here (reports share most of their words), and the
        # first position is defined for any tokenizer, with or without [CLS].
        return F.normalize(self.text_projection(hidden[:, 0]), dim=-1)          # [B, E]

    def scale(self) -> Tensor:
        """``1/temperature``, clamped at ``max_logit_scale`` as in CLIP."""
        return self.logit_scale.clamp(max=math.log(self.config.max_logit_scale)).exp()

    def forward(self, images: Tensor, present: Tensor, input_ids: Tensor,
                attention_mask: Tensor) -> Tensor:
        """``logits_per_image [B, B]``: scaled cosine similarity of image i to report j."""
        image = self.encode_image(images, present)
        text = self.encode_text(input_ids, attention_mask)
        return self.scale() * image @ text.t()

    def similarity_logits(self, image: Tensor, text: Tensor) -> Tensor:
        """Embeddings ``[B, E]`` x ``[C, E]`` -> scaled similarities ``[B, C]`` (float)."""
        return self.scale().float() * image.float() @ text.float().t()

    def per_sample_loss(self, logits_per_image: Tensor) -> Tensor:
        return clip_loss(logits_per_image)


class CLIPTask(TaskBase):
    """Image-report contrastive pretraining; labels are only used by the zero-shot metric.

    Batches carry ``input_ids``/``attention_mask`` ``[B, L]`` and ``has_report [B]`` besides
    the images (``data_needs.reports``: tokenized as ``tokenize`` does).

    On a foundation backbone (``model=foundation``) the model is the loaded CLIP/SigLIP pair
    (``models.foundation.pair``): its text tower and its tokenizer, read from the building
    side's own weights directory, replace the BERT tower and the shipped vocabulary.
    """

    batch_coupling = ("InfoNCE normalises each sample's image-report similarity over every "
                      "other sample of the batch, so one sample's loss depends on the others")
    uses_unlabelled = True

    def __init__(self, config: CLIPConfig):
        self.config = config
        directory = str(shipped_tokenizer(config.tokenizer_dir))
        self.tokenizer = load_tokenizer(directory)
        self.reports = ReportText.of(directory, config.max_length)
        names = [n.replace("_", " ") for n in config.class_names]
        self.prompts = [config.prompt_template.format(n) for n in names]
        self.prompt_tokens = self.tokenize(self.prompts) if self.prompts else None

    @property
    def data_needs(self) -> DataNeeds:
        return DataNeeds(unlabelled=True, reports=self.reports)

    def step_text_tokens(self) -> int:
        return self.config.max_length        # every report is padded to it

    def tokenize(self, texts: list[str]) -> dict[str, Tensor]:
        """``input_ids``/``attention_mask`` ``[N, max_length]`` and ``truncated [N]``."""
        return tokenize(self.tokenizer, texts, self.config.max_length)

    def wrap(self, backbone: MultiModalViT) -> CLIPModel:
        from .foundation.adapt import FoundationBackbone

        if isinstance(backbone, FoundationBackbone):
            return self._wrap_pair(backbone)
        backbone.head = None         # no classifier here; fine-tuning adds its own
        return CLIPModel(backbone, self.config, pad_id(self.tokenizer))

    def _wrap_pair(self, backbone):
        from .foundation.pair import vocab_refusal, wrap_pair

        if self.config.tokenizer_dir is not None:
            raise ValueError("task.options.tokenizer_dir must be unset for a foundation pair: "
                             "its tokenizer is read from its own weights directory")
        defaults = CLIPConfig()
        sized = [name for name in BERT_OPTIONS
                 if getattr(self.config, name) != getattr(defaults, name)]
        if sized:       # not silently ignored: they would describe a tower that is not there
            raise ValueError(f"task option(s) {', '.join(sized)} size the from-scratch BERT "
                             "tower; a foundation pair brings its own text tower: remove them")
        model = wrap_pair(backbone, max_length=self.config.max_length)
        directory = str(backbone.directory)      # this side's <foundation_dir>/<weights>
        self.tokenizer = load_tokenizer(directory)
        rows = model.text.config.vocab_size
        if vocab_size(self.tokenizer) > rows:    # this side's directory (config load: the
            raise ValueError(vocab_refusal(      # coordinator's, in directory_refusal)
                backbone.config.weights, vocab_size(self.tokenizer), rows))
        self.reports = ReportText.of(directory, self.config.max_length)
        self.prompt_tokens = self.tokenize(self.prompts) if self.prompts else None
        model.tokenizer_sha256 = self.reports.fingerprint
        return model

    def step(self, model: CLIPModel, batch: dict[str, Tensor]) -> StepOutput:
        has = batch["has_report"].bool()
        n = int(has.sum())
        truncated = batch.get("truncated")
        metrics = {"report_fraction": n / max(has.numel(), 1),
                   "truncated_fraction": float(truncated[has].float().mean())
                   if truncated is not None and n else 0.0}
        if n < 2:
            # InfoNCE needs at least one negative. A zero that still reaches every trainable
            # parameter keeps backward (and FedProx's per-parameter term) well defined; n=0
            # keeps the batch out of the reported training loss.
            zero = sum(p.sum() for p in model.parameters() if p.requires_grad) * 0.0
            return StepOutput(zero, 0, metrics | {"retrieval_accuracy": 0.0})
        logits = model(batch["image"][has], batch["present"][has], batch["input_ids"][has],
                       batch["attention_mask"][has])                          # [n, n]
        target = torch.arange(n, device=logits.device)
        metrics["retrieval_accuracy"] = float((logits.argmax(1) == target).float().mean())
        return StepOutput(model.per_sample_loss(logits).mean(), n, metrics)

    def evaluator(self) -> CLIPEvaluator:
        """InfoNCE within each batch (a batch's lone report joins a neighbour's), recall@k
        over the whole split, zero-shot AUROC."""
        return CLIPEvaluator(self.config, self.prompt_tokens)


class CLIPEvaluator:
    """Keeps every study's image and report embedding: recall@k ranks each study's match
    among all ``n_reports`` studies with a report in the evaluated set (higher n, harder),
    not within one batch.

    ``loss`` is the InfoNCE each study with a report got within its contrast group, averaged
    over them all: ``n_reports`` studies, the count sent beside it that a pool weighs each
    site's loss and recall@k by (``models.metrics.AVERAGED_OVER``); a study without a report
    is left out. A group is an evaluation batch's reports (the loss depends on the batch
    size, like the training loss), except that a batch holding a single report has nothing
    to contrast it with: that report joins the group of the batch before it (a first
    batch's, the group of the batch after it), so every report is contrasted with at least
    one other and the loss is defined over exactly ``n_reports`` studies - unless the split
    has a single report, where it is undefined (0.0, and ``AVERAGED_OVER`` gives one report
    no weight). A group that took in lone reports gives its studies more negatives than a
    plain batch (consecutive lone batches pile into one group). Every group is scored in
    float32 with autocast off (the engine evaluates under bf16 autocast on a GPU, but the
    last group is scored in ``compute``, outside it: the loss must not depend on which group
    comes last). A NaN (a diverged model) is reported, not dropped.

    Why a merge, not a count of the contrasted studies beside ``n_reports``: that count
    would give the lone reports by difference (``n_reports`` less it: at most one a batch,
    below any site's floor), so the site's floor (``client.queries.split_counts``) would
    suppress the whole otherwise reportable split - or, unchecked, send the small count. The
    merge keeps the loss's weight the count already sent and adds none.

    Zero-shot ``auroc``: the class probabilities are the softmax over the similarities of
    the image to one text prompt per class name, over the labelled studies - only when class
    names are configured and it is defined.
    """

    def __init__(self, config: CLIPConfig, prompt_tokens: dict[str, Tensor] | None):
        self.config, self.prompt_tokens = config, prompt_tokens
        self.losses: list[Tensor] = []          # per study with a report, in split order
        self._group: tuple[Tensor, Tensor] | None = None   # reports not yet contrasted [g, E]
        self._model: CLIPModel | None = None
        self.zero_shot: list[Tensor] = []
        self.has: list[Tensor] = []
        self.image: list[Tensor] = []
        self.text: list[Tensor] = []
        self.labels: list[Tensor] = []

    @torch.no_grad()
    def update(self, model: CLIPModel, batch: dict[str, Tensor]) -> None:
        has = batch["has_report"].bool()
        image = model.encode_image(batch["image"], batch["present"]).float()     # [B, E]
        text = model.encode_text(batch["input_ids"], batch["attention_mask"]).float()
        self._model = model
        self._join_group(image[has], text[has])
        if self.prompt_tokens is not None:
            ids, mask = (self.prompt_tokens[k].to(image.device)
                         for k in ("input_ids", "attention_mask"))
            prompts = model.encode_text(ids, mask).float()                          # [C, E]
            zero_shot = model.similarity_logits(image, prompts).softmax(-1)          # [B, C]
        else:
            zero_shot = image.new_zeros(image.shape[0], self.config.num_classes)
        for store, value in ((self.zero_shot, zero_shot), (self.has, has),
                             (self.image, image), (self.text, text),
                             (self.labels, batch["label"])):
            store.append(value.detach().cpu())

    def _join_group(self, image: Tensor, text: Tensor) -> None:
        """A batch's reports ``[r, E]`` join the open group; it is contrasted first, and a new
        one opened, unless one of the two holds a single report (class docstring)."""
        if image.shape[0] == 0:
            return
        if self._group is not None and min(len(self._group[0]), len(image)) >= 2:
            self._contrast_group()
        if self._group is not None:
            image, text = torch.cat([self._group[0], image]), torch.cat([self._group[1], text])
        self._group = (image, text)

    @torch.no_grad()
    def _contrast_group(self) -> None:
        """The open group's per-study InfoNCE, kept; a single report (the split's only one)
        has none."""
        if self._group is not None and len(self._group[0]) >= 2:
            image, text = self._group                           # float32 (``update``)
            with torch.autocast(image.device.type, enabled=False):
                logits = self._model.similarity_logits(image, text)             # [g, g]
                loss = self._model.per_sample_loss(logits)
            self.losses.append(loss.detach().float().cpu())
        self._group = None

    def compute(self) -> SplitMetrics:
        self._contrast_group()
        c, e = self.config.num_classes, self.config.embed_dim

        def cat(parts: list[Tensor], *shape: int, dtype=torch.float32) -> np.ndarray:
            return (torch.cat(parts) if parts else torch.zeros(0, *shape, dtype=dtype)).numpy()

        losses = cat(self.losses)                   # [n_reports]; none for a single report
        zero_shot = cat(self.zero_shot, c)
        has = cat(self.has, dtype=torch.bool)
        labels = cat(self.labels, dtype=torch.int64)
        image, text = cat(self.image, e)[has], cat(self.text, e)[has]
        similarity = image @ text.T                                              # [n, n]
        means = {name: recall_at_k(similarity if d == "i2r" else similarity.T, k)
                 for (d, k), name in RECALL_FIGURES.items()}
        labelled = labels >= 0
        auroc = (macro_auroc(labels[labelled], zero_shot[labelled])
                 if self.prompt_tokens is not None and labelled.any() else None)
        return SplitMetrics(n=len(has), loss=float(losses.mean()) if len(losses) else 0.0,
                            auroc=auroc, means=means, counts={"n_reports": float(has.sum())})


TASKS.register("clip", CLIPConfig)(CLIPTask)
