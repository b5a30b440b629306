"""dashboard.py against independent references: numpy histograms, hand-computed Tab. 1(a) rows and
TensorBoard's own tag matching."""

from __future__ import annotations

import inspect
import io
import re

import numpy as np
import pytest
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.collections import QuadMesh
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from tensorboard.plugin_util import markdown_to_safe_html
from tensorboard.plugins.custom_scalar.custom_scalars_plugin import CustomScalarsPlugin
from torch.utils.tensorboard._utils import figure_to_image
from torch.utils.tensorboard.summary import custom_scalars

from lightning_ovsw.callbacks.dashboard import (
    custom_scalars_layout,
    flip_count_figure,
    flip_count_panels,
    format_table,
    never_flipped_by_magnitude,
)


def mesh_of(fig: Figure) -> QuadMesh:
    (mesh,) = [c for c in fig.axes[0].collections if isinstance(c, QuadMesh)]
    return mesh


def drawn_histogram(fig: Figure) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What the figure shows: counts ``[x bin, y bin]`` (blank = 0) and the x and y bin edges."""
    mesh = mesh_of(fig)
    corners = mesh.get_coordinates()  # (ny + 1, nx + 1, 2)
    x_edges, y_edges = corners[0, :, 0], corners[:, 0, 1]
    counts = np.ma.filled(mesh.get_array(), 0).reshape(len(y_edges) - 1, len(x_edges) - 1)
    return counts.T, x_edges, y_edges


@pytest.mark.parametrize(
    ("max_flips", "bins", "y_edges"),
    [
        (4, 8, np.arange(6) - 0.5),  # 5 counts <= 8 bins: one bin per count
        (100, 8, np.arange(9) * 13 - 0.5),  # 101 counts: 13 counts a bin, 8 bins
        (15, 4, np.arange(5) * 4 - 0.5),  # 16 counts: 4 a bin
    ],
)
def test_figure_counts_equal_numpy_reference(max_flips: int, bins: int, y_edges: np.ndarray) -> None:
    g = torch.Generator().manual_seed(3)
    magnitude = torch.rand(2000, generator=g) * 0.3
    flips = torch.randint(0, max_flips + 1, (2000,), generator=g, dtype=torch.int32)
    flips[0] = max_flips
    fig = flip_count_figure(magnitude, flips.float(), bins, "layer1")
    counts, x_edges, got_y_edges = drawn_histogram(fig)

    m64 = magnitude.double().numpy()
    x_ref = np.linspace(0.0, m64.max(), bins + 1)
    ref, _, _ = np.histogram2d(m64, flips.double().numpy(), bins=[x_ref, y_edges])
    np.testing.assert_allclose(x_edges, x_ref, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(got_y_edges, y_edges)
    np.testing.assert_array_equal(counts, ref)
    assert counts.sum() == 2000
    mask = np.ma.getmaskarray(mesh_of(fig).get_array()).reshape(counts.T.shape)
    np.testing.assert_array_equal(mask, ref.T == 0)  # empty bins are blank, not the lowest colour


def test_side_by_side_panels_share_bins_and_count_like_numpy() -> None:
    g = torch.Generator().manual_seed(5)
    runs = {"vanilla": (torch.rand(300, generator=g) * 0.2, torch.randint(0, 3, (300,), generator=g).float()),
            "ovsw": (torch.rand(400, generator=g) * 0.5, torch.randint(0, 40, (400,), generator=g).float())}
    fig = flip_count_panels(runs, 8)
    panels = fig.axes[:2]  # then the colour bar's axes
    meshes = [next(c for c in ax.collections if isinstance(c, QuadMesh)) for ax in panels]
    assert [ax.get_title() for ax in panels] == ["vanilla", "ovsw"] and len(fig.axes) == 3
    x_ref = np.linspace(0.0, float(runs["ovsw"][0].max()), 9)  # the larger run's range for both
    y_ref = np.arange(9) * 5 - 0.5  # counts 0..39 (at most) in 8 bins of 5
    y_ref = y_ref[: int(np.searchsorted(y_ref, float(runs["ovsw"][1].max()))) + 1]
    for mesh, (m, f) in zip(meshes, runs.values(), strict=True):
        corners = mesh.get_coordinates()
        np.testing.assert_allclose(corners[0, :, 0], x_ref, atol=1e-12)
        np.testing.assert_array_equal(corners[:, 0, 1], y_ref)
        ref, _, _ = np.histogram2d(m.double().numpy(), f.double().numpy(), bins=[x_ref, y_ref])
        got = np.ma.filled(mesh.get_array(), 0).reshape(len(y_ref) - 1, len(x_ref) - 1).T
        np.testing.assert_array_equal(got, ref)
    assert meshes[0].norm is meshes[1].norm  # one colour scale
    with pytest.raises(ValueError, match="no panels"):
        flip_count_panels({}, 8)


def test_figure_by_hand_empty_bins_blank() -> None:
    # 2 bins: x edges 0, 0.45, 0.9; flip counts 0..3 two per bin, y edges -0.5, 1.5, 3.5
    fig = flip_count_figure(torch.tensor([0.1, 0.9, 0.8]), torch.tensor([0.0, 3.0, 3.0]), 2, "t")
    counts, x_edges, y_edges = drawn_histogram(fig)
    np.testing.assert_allclose(x_edges, [0.0, 0.45, 0.9])
    np.testing.assert_array_equal(y_edges, [-0.5, 1.5, 3.5])
    np.testing.assert_array_equal(counts, [[1, 0], [0, 2]])
    mask = np.ma.getmaskarray(mesh_of(fig).get_array()).reshape(2, 2)
    np.testing.assert_array_equal(mask, counts.T == 0)
    fig.canvas.draw()
    pixels = np.asarray(fig.canvas.buffer_rgba())
    height = pixels.shape[0]

    def rgb_at(x: float, y: float) -> tuple[int, ...]:
        px, py = fig.axes[0].transData.transform((x, y))
        return tuple(pixels[height - int(py), int(px), :3])

    white = (255, 255, 255)
    assert rgb_at(0.675, 0.5) == white and rgb_at(0.225, 2.5) == white  # empty bins: background
    assert white != rgb_at(0.225, 0.5) != rgb_at(0.675, 2.5) != white  # 1 and 2 weights: two colours


def test_figure_axes_colorbar_lognorm_and_size() -> None:
    fig = flip_count_figure(torch.rand(500), torch.randint(0, 7, (500,)).float(), 32, "model.layer1.0.conv1.weight")
    ax, mesh = fig.axes[0], mesh_of(fig)
    assert ax.get_xlabel() == "|W| (latent weight magnitude)"
    assert ax.get_ylabel() == "sign flips during training so far"
    assert ax.get_title() == "model.layer1.0.conv1.weight"
    assert isinstance(mesh.norm, LogNorm) and mesh.norm.vmin == 1.0
    assert mesh.colorbar is not None and mesh.colorbar.ax.get_ylabel() == "weights per bin"
    image = figure_to_image(fig)  # what SummaryWriter.add_figure does
    assert image.shape == (3, 320, 400) and image.dtype == np.uint8


@pytest.mark.parametrize(
    ("magnitude", "flips"),
    [
        (torch.rand(100), torch.zeros(100)),  # nothing flipped yet
        (torch.tensor([0.25]), torch.tensor([3.0])),  # a single weight
        (torch.full((50,), 0.1), torch.randint(0, 3, (50,)).float()),  # all |W| equal
        (torch.zeros(20), torch.zeros(20)),  # all zero
    ],
)
def test_figure_degenerate_inputs_render(magnitude: torch.Tensor, flips: torch.Tensor) -> None:
    fig = flip_count_figure(magnitude, flips, 16, "t")
    fig.savefig(io.BytesIO(), format="png")
    assert drawn_histogram(fig)[0].sum() == magnitude.numel()


BAD_INPUTS = [
    (torch.tensor([0.1, float("nan")]), torch.tensor([0.0, 1.0]), "NaN or inf"),
    (torch.tensor([0.1, 0.2]), torch.tensor([0.0, float("inf")]), "NaN or inf"),
    (torch.tensor([0.1, float("-inf")]), torch.tensor([0.0, 1.0]), "NaN or inf"),
    (torch.tensor([0.1, 0.2]), torch.tensor([0.0]), "one flip count per weight"),
    (torch.tensor([]), torch.tensor([]), "empty"),
    (torch.tensor([0.1]), torch.tensor([-1.0]), "negative"),
]


@pytest.mark.parametrize(("magnitude", "flips", "message"), BAD_INPUTS)
def test_bad_input_raises_value_error(magnitude: torch.Tensor, flips: torch.Tensor, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        flip_count_figure(magnitude, flips, 8, "t")
    with pytest.raises(ValueError, match=message):
        never_flipped_by_magnitude(magnitude, flips)


def test_bins_must_be_positive() -> None:
    with pytest.raises(ValueError, match="bins"):
        flip_count_figure(torch.rand(4), torch.zeros(4), 0, "t")
    with pytest.raises(ValueError, match="bins"):
        never_flipped_by_magnitude(torch.rand(4), torch.zeros(4), 0)


def test_never_flipped_rows_by_hand() -> None:
    magnitude = torch.tensor([0.5, 0.1, 0.9, 0.3, 0.7, 0.2, 0.8, 0.4, 0.6, 1.0])
    flips = torch.tensor([0, 3, 0, 1, 0, 2, 0, 0, 1, 0], dtype=torch.int32)
    # sorted by |W|: (0.1: 3, 0.2: 2) (0.3: 1, 0.4: 0) (0.5: 0, 0.6: 1) (0.7: 0, 0.8: 0) (0.9: 0, 1.0: 0)
    expected = [(0.1, 0.2, 2, 0.0), (0.3, 0.4, 2, 0.5), (0.5, 0.6, 2, 0.5), (0.7, 0.8, 2, 1.0), (0.9, 1.0, 2, 1.0)]
    rows = never_flipped_by_magnitude(magnitude, flips)
    assert [r["bin"] for r in rows] == [0, 1, 2, 3, 4]
    got = [(r["abs_w_min"], r["abs_w_max"], r["weights"], r["never_flipped"]) for r in rows]
    assert got == [pytest.approx(e) for e in expected]


def test_never_flipped_uneven_and_few_weights() -> None:
    # 7 weights in 3 bins: 3 + 2 + 2, in |W| order
    magnitude = torch.tensor([0.07, 0.01, 0.06, 0.02, 0.05, 0.03, 0.04])
    flips = torch.tensor([0, 1, 0, 0, 2, 1, 0])
    rows = never_flipped_by_magnitude(magnitude, flips, bins=3)
    got = [(r["abs_w_min"], r["abs_w_max"], r["weights"], r["never_flipped"]) for r in rows]
    assert got == [pytest.approx(e) for e in [(0.01, 0.03, 3, 1 / 3), (0.04, 0.05, 2, 0.5), (0.06, 0.07, 2, 1.0)]]
    two = never_flipped_by_magnitude(torch.tensor([0.2, 0.1]), torch.tensor([1, 0]), bins=5)
    assert [(r["weights"], r["never_flipped"]) for r in two] == [(1, 1.0), (1, 0.0)]


def test_format_table_markdown_renders_in_tensorboard() -> None:
    rows = [
        {"bin": 0, "abs_w_min": 0.00123, "abs_w_max": 0.0456, "weights": 10, "never_flipped": 0.25},
        {"bin": 1, "abs_w_min": 0.0456, "abs_w_max": 0.5, "weights": 9, "never_flipped": 1.0},
    ]
    text = format_table(rows)
    assert text.splitlines()[2] == "| 1 | 0.00123 – 0.0456 | 10 | 25.0 % |"
    assert text.splitlines()[3] == "| 2 | 0.0456 – 0.5 | 9 | 100.0 % |"
    html = markdown_to_safe_html(text)  # what TensorBoard's Text tab does with add_text
    assert html.count("<th>") == 4 and html.count("<tr>") == 3
    assert re.findall(r"<th[^>]*>([^<]*)</th>", html) == ["|W| bin", "|W| range", "weights", "never flipped"]


LAYERS = ["model.layer1.0.conv1.weight", "model.layer3.2.conv2.weight", "features.all_convs.3.weight", "allx"]
FLIP_PREFIXES = ["flips/rate", "flips/silent_run", "flips/silent_epoch"]
OTHER_TAGS = [
    "ags/scaled_fraction", "ags/mean_grad_weight_ratio", "sad/penalized_fraction",
    "train/loss_step", "val/acc1", "epoch", "hp_metric", "flips/abs_weight/model.layer1.0.conv1.weight",
]
ALL_TAGS = [f"{p}/{n}" for p in FLIP_PREFIXES for n in ["all", *LAYERS]] + OTHER_TAGS


def tensorboard_matches(tag_regexes: list[str], tag: str) -> bool:
    """TensorBoard 2.21's matching: the frontend joins several regexes as ``(a)|(b)``, the backend keeps
    ``re.compile(regex).match(tag)``."""
    joined = tag_regexes[0] if len(tag_regexes) == 1 else "|".join(f"({r})" for r in tag_regexes)
    return re.compile(joined).match(tag) is not None


def test_tensorboard_still_matches_with_re_match() -> None:
    assert "regex.match(tag)" in inspect.getsource(CustomScalarsPlugin.scalars_impl)


def test_layout_regexes_select_the_intended_tags() -> None:
    layout = custom_scalars_layout()
    expected: dict[str, set[str]] = {}
    for prefix, what in zip(FLIP_PREFIXES, ["flip rate per step", "run so far", "this epoch"], strict=True):
        (overall,) = [c for c in layout["OvSW flips"] if what in c and c.endswith("(all layers)")]
        (per_layer,) = [c for c in layout["OvSW flips"] if what in c and c.endswith("per layer")]
        expected[overall] = {f"{prefix}/all"}
        expected[per_layer] = {f"{prefix}/{n}" for n in LAYERS}
    gradients = layout["OvSW gradients"]
    for tag in ["ags/scaled_fraction", "ags/mean_grad_weight_ratio", "sad/penalized_fraction"]:
        (chart,) = [c for c, (_, regexes) in gradients.items() if regexes == [f"{tag}$"]]
        expected[chart] = {tag}
    charts = {**layout["OvSW flips"], **gradients}
    assert set(charts) == set(expected)
    for title, (kind, regexes) in charts.items():
        assert kind == "Multiline"
        assert {t for t in ALL_TAGS if tensorboard_matches(regexes, t)} == expected[title], title
    custom_scalars(layout)  # SummaryWriter.add_custom_scalars accepts it


def test_figure_bypasses_pyplot() -> None:
    """Built on an Agg canvas, not registered with pyplot: the user's backend and open figures are untouched."""
    import matplotlib.pyplot as plt

    before = plt.get_fignums()
    fig = flip_count_figure(torch.rand(10), torch.zeros(10), 4, "t")
    assert isinstance(fig.canvas, FigureCanvasAgg) and plt.get_fignums() == before
