"""A pt2 archive written again with new weights (``server/pt2_archive.py``) is, record for
record, what ``torch.export.save`` writes for the same program - pinned here, so a torch
upgrade that changes the archive's layout fails this test, not a registered model."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.export.pt2_archive._package import PT2ArchiveReader

from server.pt2_archive import Pt2Template


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 5)
        self.norm = nn.LayerNorm(5)
        self.register_buffer("shift", torch.linspace(-1, 1, 5))
        self.register_buffer("table", torch.arange(5.0), persistent=False)  # a constant
        self.head = nn.Linear(5, 3, bias=False)

    def forward(self, x):
        return self.head(self.norm(self.proj(x)) + self.shift + self.table).softmax(-1)


def _program(tmp_path, model, dtype=torch.float32):
    """``model`` traced, saved and loaded as ``ReusedExport`` holds it, and its archive."""
    x = torch.zeros(2, 6, dtype=dtype)
    batch = torch.export.Dim("batch")
    traced = torch.export.export(model.eval(), (x,), dynamic_shapes=({0: batch},))
    path = tmp_path / "template" / "model.pt2"
    path.parent.mkdir()
    torch.export.save(traced, str(path))
    return torch.export.load(str(path)), path


def _set_weights(program, model):
    state = model.state_dict()
    with torch.no_grad():
        for k, v in (dict(program.state_dict) | dict(program.constants)).items():
            if k in state:
                v.copy_(state[k])


def _records(path):
    reader = PT2ArchiveReader(str(path))
    names = reader.archive_file.get_all_records()
    return names, {n: reader.read_bytes(n) for n in names}


def test_a_rewritten_archive_is_what_torch_export_save_writes_and_scores_like_the_model(
        tmp_path):
    torch.manual_seed(0)
    program, template_path = _program(tmp_path, _Net())
    # the template is the archive the program was saved as *after* a load, as torch writes it
    torch.export.save(program, str(template_path))
    template = Pt2Template.read(template_path, program)
    assert template is not None

    torch.manual_seed(1)
    trained = _Net().eval()           # this round's weights, same graph
    _set_weights(program, trained)
    ours, theirs = tmp_path / "ours" / "model.pt2", tmp_path / "theirs" / "model.pt2"
    ours.parent.mkdir(), theirs.parent.mkdir()
    assert template.write(ours, program)
    torch.export.save(program, str(theirs))

    names, got = _records(ours)
    expected_names, expected = _records(theirs)
    assert names == expected_names      # same records, same order
    differing = [n for n in names if got[n] != expected[n]]
    # the zip writer's own id is the only record allowed to differ
    assert set(differing) <= {".data/serialization_id"}, differing

    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(2))
    loaded = torch.export.load(str(ours)).module()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), trained(x), rtol=0, atol=0)
        # and these are this round's weights, not the template's
        assert not torch.allclose(loaded(x), torch.export.load(str(template_path)).module()(x))


def test_a_layout_it_does_not_know_is_refused_not_guessed(tmp_path):
    torch.manual_seed(0)
    program, path = _program(tmp_path, _Net())
    # a program whose tensors are not those the archive holds: the bytes check refuses it
    with torch.no_grad():
        next(iter(program.state_dict.values())).add_(1.0)
    assert Pt2Template.read(path, program) is None


def test_a_weights_config_in_another_format_is_refused_not_raised(tmp_path, monkeypatch):
    torch.manual_seed(0)
    program, path = _program(tmp_path, _Net())
    real = Pt2Template._layout.__func__

    def renamed(cls, records, program):       # e.g. a torch whose config says "weights"
        records = {name: (data.replace(b'"config"', b'"weights"') if name.endswith(".json")
                          else data) for name, data in records.items()}
        return real(cls, records, program)

    monkeypatch.setattr(Pt2Template, "_layout", classmethod(renamed))
    assert Pt2Template.read(path, program) is None


def test_a_tensor_that_no_longer_fills_its_record_writes_nothing(tmp_path):
    torch.manual_seed(0)
    program, path = _program(tmp_path, _Net())
    template = Pt2Template.read(path, program)
    assert template is not None
    key = next(iter(program.state_dict))
    program.state_dict[key] = torch.zeros(1)
    out = tmp_path / "out" / "model.pt2"
    out.parent.mkdir()
    assert not template.write(out, program)
    assert not out.exists()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_raw_bytes_match_torch_for_each_dtype(tmp_path, dtype):
    torch.manual_seed(0)
    program, path = _program(tmp_path, _Net().to(dtype), dtype)
    assert Pt2Template.read(path, program) is not None
