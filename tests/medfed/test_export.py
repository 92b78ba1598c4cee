"""``medfed export``'s message says what the directory is for: ``model.pretrained=DIR`` for
MedFed's own ViT only; a foundation model's export names its encoder, adapter and
adaptation parts and the call that loads each."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from medfed.export import exported_message  # noqa: E402
from models.foundation.export import export_foundation  # noqa: E402
from tests.models.test_foundation import _build, _save  # noqa: E402


@pytest.mark.parametrize("family,loader", [
    ("dinov2", "Dinov2Model.from_pretrained("),
    ("monai_vit", "ViT(**json.load(open("),
])
def test_a_foundation_export_names_its_encoder_and_never_model_pretrained(tmp_path, family,
                                                                          loader):
    _save(family, tmp_path / "encoders" / "enc")
    model = _build(tmp_path / "encoders" / "enc", method="lora", lora_rank=2)
    out = export_foundation(model, tmp_path / "dino-ft")

    said = exported_message(out, "medfed-classifier", "3")
    assert "model.pretrained=" not in said
    assert said.startswith(f"exported medfed-classifier version 3 to {out}: a foundation model")
    assert f"{loader}'{out / 'encoder'}" in said
    assert f"PeftModel.from_pretrained(original_encoder, '{out / 'adapter'}')" in said
    assert f"load_export('{out}')" in said
    assert "medfed predict --model models:/medfed-classifier/3 --data-dir" in said
    assert "\x1b" not in said


def test_medfed_own_vit_export_keeps_the_model_pretrained_hint(tmp_path):
    assert exported_message(tmp_path, "medfed-backbone", "2") == (
        f"exported medfed-backbone version 2 to {tmp_path} "
        f"(start a run from it with model.pretrained={tmp_path})")
