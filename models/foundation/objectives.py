"""Self-supervised objectives (MM-DINOv2, MAE, CLIP) starting from a loaded foundation model.

The objectives in ``models/dino.py``, ``models/mae.py`` and ``models/clip.py`` run on any
backbone with the ``MultiModalViT`` interface (``layout``, ``forward_features(images, present,
hidden)``, ``attention_mask``, ``pool``, ``head``); ``FoundationBackbone`` has it. What differs
for a pretrained backbone lives here: which families an objective can use (``check_pretraining``,
one line when not) and MAE's decoder taken from a ``ViTMAEForPreTraining`` directory.

What trains and travels is the backbone's ``method`` (LoRA adapters + the adaptation's new
parts, as for supervised fine-tuning) plus the objective's own heads; the frozen base stays
each site's own copy, checked by digest.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import Tensor, nn

from ..vit import TokenLayout
from .adapt import FoundationBackbone
from .families import _interpolate_grid

log = logging.getLogger(__name__)


# What each pretraining objective needs of a foundation backbone.
NEEDS: dict[str, tuple[str, ...]] = {
    "mm_dino": ("cls",),             # image-level self-distillation reads the CLS token
    "mae": ("cls", "masking"),       # hidden tokens; the decoder keeps the CLS slot
    "clip": ("pair",),               # a text tower (and its tokenizer) beside the image tower
}
PAIR_MODEL_TYPES = ("clip", "siglip")     # config.json model_type of a full CLIP/SigLIP pair


def objective_refusal(objective: str, family: str, method: str, *, has_cls: bool,
                      masks_tokens: bool, pair: bool,
                      channel_tokens: str = "per_channel") -> str | None:
    """Why ``objective`` cannot start from a ``family`` encoder trained with ``method``
    (one line), or None. The site checks the built backbone (``check_pretraining``); the
    coordinator checks the directory at config load (``directory_refusal``)."""
    needs = NEEDS.get(objective)
    if needs is None:
        return None
    if method == "linear_probe":
        return (f"{objective} from a foundation model cannot use method=linear_probe (it "
                "trains only the class head); use lora, dora, ia3 or full")
    if "cls" in needs and not has_cls:
        return (f"{objective} from a foundation model needs an encoder with a CLS token; the "
                f"{family} encoder has none (use dinov2, vit, vit_mae, clip or a MONAI ViT "
                "built with classification=True)")
    if "masking" in needs and channel_tokens != "per_channel":
        # MAE reconstructs one channel's patch per token; a fused token holds every channel
        return (f"{objective} from a foundation model needs channel_tokens=per_channel (its "
                f"target is one channel's patch per token), got {channel_tokens}")
    if "masking" in needs and not masks_tokens:
        return (f"{objective} from a foundation model needs an encoder that takes an attention "
                f"mask to hide tokens; the {family} encoder has none")
    if "pair" in needs and not pair:
        return (f"{objective} from a foundation model needs a CLIPModel or SiglipModel "
                f"directory (image and text towers); this one holds a {family} vision encoder "
                "only")
    return None


def check_pretraining(backbone: FoundationBackbone, objective: str) -> None:
    """Refuse, in one line, a backbone the objective cannot start from (``objective_refusal``)."""
    reason = objective_refusal(
        objective, backbone.family, backbone.config.method, has_cls=backbone.seams.has_cls,
        masks_tokens=backbone.seams.masks_tokens, pair="text_model" in backbone.companions,
        channel_tokens=backbone.config.channel_tokens)
    if reason:
        raise ValueError(reason)


def directory_refusal(directory, objective: str, method: str,
                      channel_tokens: str = "per_channel", max_length: int | None = None
                      ) -> str | None:
    """``objective_refusal`` for the encoder directory ``directory``, from its config.json
    alone (no weights loaded): the coordinator's config-load check. A pair's tokenizer is
    checked against its text tower's vocabulary; ``max_length``: an image-report objective's
    report length, checked against the pair's text positions."""
    from .families import FAMILIES
    from .loading import MONAI_MODEL_TYPE, family_of, read_config
    from .timm_vit import TIMM_FAMILY, parse_config

    config = read_config(directory)
    family = family_of(directory)
    seams = FAMILIES[family]
    has_cls = (bool(config.get("constructor", {}).get("classification", False))
               if family == MONAI_MODEL_TYPE else seams.has_cls)
    if family == TIMM_FAMILY:
        has_cls = parse_config(config).class_token
    pair = config.get("model_type") in PAIR_MODEL_TYPES
    reason = objective_refusal(objective, family, method, has_cls=has_cls,
                               masks_tokens=seams.masks_tokens, pair=pair,
                               channel_tokens=channel_tokens)
    if reason is None and "pair" in NEEDS.get(objective, ()):
        from ..text import TOKENIZER_FILES

        if not any((Path(directory) / name).is_file() for name in TOKENIZER_FILES):
            reason = (f"{objective} from a foundation pair reads its tokenizer from the same "
                      f"directory, which has none of {', '.join(TOKENIZER_FILES)}")
    if reason is None and pair and "pair" in NEEDS.get(objective, ()):
        import transformers

        from ..text import load_tokenizer, vocab_size
        from .pair import text_length_refusal, vocab_refusal

        text = transformers.AutoConfig.from_pretrained(str(directory),
                                                       local_files_only=True).text_config
        try:
            tokens = vocab_size(load_tokenizer(directory))
        except Exception as err:    # noqa: BLE001 - a third-party parser's any failure
            return (f"{objective} from a foundation pair reads its tokenizer from the same "
                    f"directory, and the one in {Path(directory).name!r} cannot be read "
                    f"({type(err).__name__}): put the pair's own tokenizer files beside its "
                    "weights")
        positions = text.max_position_embeddings
        if tokens > text.vocab_size:
            reason = vocab_refusal(Path(directory).name, tokens, text.vocab_size)
        elif max_length is not None and max_length > positions:
            reason = text_length_refusal(Path(directory).name, max_length, positions)
    return reason


class PretrainedMAEDecoder(nn.Module):
    """ViTMAE's pretrained decoder over our multi-channel token layout.

    Its own parts are reused as they are (embedding, transformer layers, norm); what the
    layout adds is new and starts neutral: a per-channel embedding (zero) beside the
    decoder's sin-cos positions (interpolated to our grid and shared by every channel, as the
    encoder's are), and a one-channel pixel predictor (the RGB predictor averaged over its
    colours, as the patch embedding is; new if our patch size differs from the family's).
    Same interface as ``models.mae.MAEDecoder``; every trainable parameter is in an
    ``nn.Linear`` or ``nn.LayerNorm`` (the mask token is a bias-free Linear of the mask
    indicator), so the per-sample DP-SGD rule covers it.
    """

    def __init__(self, decoder: nn.Module, layout: TokenLayout, family_patch: int):
        super().__init__()
        if layout.cls_tokens != 1:
            raise ValueError("the pretrained MAE decoder expects a CLS token")
        width = decoder.decoder_embed.out_features
        s = layout.num_sequences
        self.num_sequences = s
        self.layer_config = decoder.config          # its attention implementation's mask
        self.embed = decoder.decoder_embed
        self.mask_token = nn.Linear(1, width, bias=False)
        self.seq_embed = nn.Linear(s, width, bias=False)
        with torch.no_grad():
            self.mask_token.weight.copy_(decoder.mask_token.detach().reshape(width, 1))
            nn.init.zeros_(self.seq_embed.weight)
        pos = decoder.decoder_pos_embed.detach()                          # [1, 1+N0, W]
        grid = layout.img_size // layout.patch_size
        self.register_buffer("cls_pos", pos[:, :1].clone(), persistent=False)
        self.register_buffer("pos_embed", _interpolate_grid(pos[:, 1:], grid).clone(),
                             persistent=False)                            # [1, N, W]
        self.layers = decoder.decoder_layers
        self.norm = decoder.decoder_norm
        old = decoder.decoder_pred                                        # [p0*p0*C, W]
        self.pred = nn.Linear(width, layout.patch_dim)
        if family_patch == layout.patch_size:
            # HF's patchify orders a patch's pixels (row, column, colour)
            with torch.no_grad():
                self.pred.weight.copy_(old.weight.detach().reshape(
                    layout.patch_dim, -1, width).mean(1))
                self.pred.bias.copy_(old.bias.detach().reshape(layout.patch_dim, -1).mean(1))
        else:
            # the pretrained predictor's pixels are another patch's: nothing of it maps
            log.info("MAE decoder: the pretrained pixel predictor is for %d-pixel patches and "
                     "the layout's are %d; a new predictor is trained from scratch",
                     family_patch, layout.patch_size)
            nn.init.xavier_uniform_(self.pred.weight)
            nn.init.zeros_(self.pred.bias)

    def forward(self, tokens: Tensor, masked: Tensor, attend: Tensor) -> Tensor:
        """Encoder tokens ``[B, 1+S*N, D]`` -> pixel predictions ``[B, S*N, p*p]``."""
        from transformers.masking_utils import create_bidirectional_mask

        from ..mae import decoder_inputs

        x, patches = decoder_inputs(self, tokens, masked)
        patches = patches + self.pos_embed.to(x.dtype).repeat(1, self.num_sequences, 1)
        x = torch.cat([x[:, :1] + self.cls_pos.to(x.dtype), patches], dim=1)
        mask = create_bidirectional_mask(config=self.layer_config, inputs_embeds=x,
                                         attention_mask=attend)
        for layer in self.layers:
            x = layer(x, mask)
        return self.pred(self.norm(x))[:, 1:]


def mae_decoder(backbone: FoundationBackbone) -> nn.Module | None:
    """The pretrained decoder of a ``ViTMAEForPreTraining`` directory adapted to the layout,
    or None (the caller builds a new one)."""
    decoder = backbone.take_companions().get("decoder")
    if decoder is None:
        return None
    return PretrainedMAEDecoder(decoder, backbone.layout,
                                backbone.seams.patch_size(backbone.encoder))


__all__ = ["NEEDS", "PretrainedMAEDecoder", "check_pretraining", "directory_refusal", "mae_decoder",
           "objective_refusal"]
