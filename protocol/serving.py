"""What a registered model version needs to be scored on new studies: its modality layout, the
preprocessing the sites applied, its class names and the kind of output it gives: class
probabilities per study (``softmax``, ``sigmoid``) or, for a segmentation network (the UNETR
decoder on our ViT, or a fine-tuned SwinUNETR), class probabilities per voxel of the model's grid (``voxel_softmax``, class 0 the
background: :data:`SEGMENTATION_CLASS_NAMES`).

The server writes a :class:`ServingSpec` into every registered version's MLflow model
metadata (:meth:`ServingSpec.to_metadata`, beside the pyfunc's tensor signature); ``medfed
predict`` reads it back (:meth:`ServingSpec.from_metadata`) and nothing else: the layout and
the preprocessing come from the version, never from the data folder. The spec is data (the
layout re-validated by :meth:`protocol.layout.Layout.from_dict`, names checked), never code
or paths. One place defines what the preprocessing record says, so the writer and the reader
cannot drift: :meth:`from_metadata` refuses a record that differs from the one this MedFed
would write for the same layout (a version preprocessed by another MedFed release).

The preprocessing is what the sites' readers and ``client.data.dataset.StudyDataset``
(evaluation transforms) do today:

- ``brain_mri_4seq`` (the default reader, :func:`client.data.site.load_site`): the middle
  slice of each sequence's volume (slices by InstanceNumber), modality LUT, each channel
  resized to ``image_size`` (area), then z-scored over its nonzero pixels, channel by channel.
- any other (2D) layout (:func:`client.data.layout_site.load_layout_site`): the middle image
  of the matched series, each channel's own intensity handling (CT windows to ``[0, 1]``, X-ray
  VOI LUT with MONOCHROME1 inverted, ...), resized to ``image_size`` (area), not z-scored.
- a 3D layout: the matched series as a volume (slices by ImagePositionPatient), resampled
  onto the layout's grid (orientation :data:`protocol.layout.VOLUME_AXCODES`, its spacing and
  size), then the channel's intensity (CT windows of HU), resized to the ``image_size`` cube
  (area), not z-scored.

Either way an absent channel is all zeros, which the served model reads as absent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from .layout import DEFAULT_LAYOUT, VOLUME_AXCODES, Layout, LayoutError, check_volume_layout

PREPROCESSING_VERSION = 1
# per study: multi-class probabilities; one per finding. per voxel: [C, *grid] probabilities.
OUTPUTS = ("softmax", "sigmoid", "voxel_softmax")
SEGMENTATION_CLASS_NAMES = ("background", "lesion")    # the segmentation task's 2 classes

KEY_LAYOUT = "medfed_layout"
KEY_PREPROCESSING = "medfed_preprocessing"
KEY_CLASS_NAMES = "medfed_class_names"
KEY_TASK = "medfed_task"
METADATA_KEYS = (KEY_LAYOUT, KEY_PREPROCESSING, KEY_CLASS_NAMES, KEY_TASK)


class ServingSpecError(ValueError):
    """A model version's metadata cannot say how to score it; the message says why."""


@dataclass(frozen=True)
class ServingSpec:
    """How to turn a study into a registered model's input, and what comes out.

    Parameters
    ----------
    layout : Layout
        The modality layout the sites read (``brain_mri_4seq`` included).
    class_names : tuple of str
        One output column (``voxel_softmax``: one output channel) per name, in the model's
        order; a segmenter's first is the background.
    task : str
        The task the version was trained for (e.g. ``classification``, ``segmentation``).
    output : str
        ``softmax`` (class probabilities summing to 1), ``sigmoid`` (one independent
        probability per finding, multi-label) or ``voxel_softmax`` (class probabilities
        summing to 1 at each voxel of the input grid, ``[C, *spatial]`` per study).
    image_size : int
        Side of each channel's square (3D layouts: cubic) input after resizing.
    """

    layout: Layout
    class_names: tuple[str, ...]
    task: str
    output: str
    image_size: int

    def __post_init__(self):
        if self.output not in OUTPUTS:
            raise ServingSpecError(f"output {self.output!r} is not one of {', '.join(OUTPUTS)}")
        if not self.class_names or len(set(self.class_names)) != len(self.class_names):
            raise ServingSpecError(f"class names must be distinct and non-empty, got "
                                   f"{list(self.class_names)!r}")
        if self.output == "voxel_softmax" and len(self.class_names) < 2:
            raise ServingSpecError(f"a segmentation output needs a background and at least "
                                   f"one other class, got {list(self.class_names)!r}")
        if self.image_size < 1:
            raise ServingSpecError(f"image_size must be >= 1, got {self.image_size}")
        if self.layout.dims == "3d":
            try:
                check_volume_layout(self.layout)
            except LayoutError as err:
                raise ServingSpecError(str(err)) from None

    @property
    def segmentation(self) -> bool:
        """Per-voxel output (a mask per study) rather than per-study probabilities."""
        return self.output == "voxel_softmax"

    def output_shape(self) -> tuple[int, ...]:
        """What the model gives per study: ``(C,)``, or ``(C, *spatial)`` per voxel."""
        spatial = self.preprocessing()["input_shape"][1:] if self.segmentation else []
        return (len(self.class_names), *spatial)

    @property
    def site_layout(self) -> Layout | None:
        """The layout a job carries to a site: None for the default reader (brain_mri_4seq)."""
        return None if self.layout.name == DEFAULT_LAYOUT else self.layout

    @property
    def channels(self) -> tuple[str, ...]:
        """The model's input channels, in order."""
        return self.layout.input_channels

    @property
    def zscore(self) -> bool:
        """Channels z-scored by the dataset (the default reader) rather than kept at the
        layout's intensity scale."""
        return self.site_layout is None

    def preprocessing(self) -> dict[str, Any]:
        """The preprocessing record (JSON-safe): what the sites did to a study before the
        model saw it, for a reader of the MLmodel file and for :meth:`from_metadata`'s check."""
        layout = self.layout
        intensity = {}
        for c in layout.channels:
            i = c.intensity
            intensity[c.name] = {"kind": i.kind} | (
                {"windows_hu": [{"name": w.name, "center": w.center, "width": w.width}
                                for w in i.windows]} if i.kind == "ct_window" else {})
        axes = 3 if layout.dims == "3d" else 2
        record = {
            "version": PREPROCESSING_VERSION,
            "reader": "brain_mri_4seq" if self.zscore else "layout",
            "channels": list(self.channels),            # model input order
            "input_shape": [len(self.channels), *[self.image_size] * axes],
            "dims": layout.dims,
            "image": "middle slice of the series (by InstanceNumber)",
            "image_size": [self.image_size] * axes,
            "resize": "area, each channel on its own",
            "spacing_mm": list(layout.spacing) if layout.spacing is not None else None,
            "intensity": intensity,                     # per layout channel
            "normalization": ("zscore over nonzero pixels, per channel" if self.zscore
                              else "none (the layout's intensity scale)"),
            "missing_channel": "all zeros",
            "dtype": "float32",
        }
        if axes == 3:
            record |= {"image": "the series as a volume (slices by ImagePositionPatient on the "
                                "normal), resampled onto the layout's grid",
                       "grid_size": list(layout.size), "grid_orientation": VOLUME_AXCODES,
                       "resize": "area, each channel on its own, grid to image_size cube"}
        return record

    def to_metadata(self) -> dict[str, Any]:
        """The MLmodel ``metadata`` entries (JSON-safe) :meth:`from_metadata` reads back."""
        return {KEY_LAYOUT: self.layout.to_dict(),
                KEY_PREPROCESSING: self.preprocessing(),
                KEY_CLASS_NAMES: list(self.class_names),
                KEY_TASK: {"name": self.task, "output": self.output}}

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any] | None) -> ServingSpec:
        """Read and validate a version's metadata.

        Raises
        ------
        ServingSpecError
            No MedFed serving metadata (a version registered before it was recorded, or an
            encoder), an invalid layout, or a preprocessing record that differs from what this
            MedFed does for that layout.
        """
        metadata = metadata or {}
        missing = [k for k in METADATA_KEYS if k not in metadata]
        if missing:
            raise ServingSpecError(
                "the model version carries no MedFed layout/preprocessing metadata (missing "
                f"{', '.join(missing)}): it was registered by an older MedFed or is an "
                "encoder; register it again with this MedFed to score new studies")
        try:
            layout = Layout.from_dict(metadata[KEY_LAYOUT])
        except LayoutError as err:
            raise ServingSpecError(f"the version's layout is invalid: {err}") from None
        task, prep = metadata[KEY_TASK], metadata[KEY_PREPROCESSING]
        names = metadata[KEY_CLASS_NAMES]
        if not isinstance(task, Mapping) or not isinstance(prep, Mapping) or \
                not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ServingSpecError("the version's serving metadata is malformed")
        if prep.get("version") != PREPROCESSING_VERSION:
            raise ServingSpecError(f"the version was preprocessed with preprocessing version "
                                   f"{prep.get('version')!r}; this MedFed applies version "
                                   f"{PREPROCESSING_VERSION}")
        size = prep.get("image_size")
        if not isinstance(size, list) or len(size) not in (2, 3) or len(set(size)) != 1 or \
                not isinstance(size[0], int):
            raise ServingSpecError(f"the version's image_size is malformed: {size!r}")
        spec = cls(layout=layout, class_names=tuple(names), task=str(task.get("name", "")),
                   output=str(task.get("output", "")), image_size=size[0])
        if spec.preprocessing() != dict(prep):
            raise ServingSpecError("the version's preprocessing record differs from what this "
                                   "MedFed applies for its layout; score it with the MedFed "
                                   "release that registered it")
        return spec
