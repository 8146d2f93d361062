import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

import mux  # noqa: E402


def test_plot_accuracy_vs_n_draws_one_line_per_label_and_chance():
    ax = mux.plots.plot_accuracy_vs_n({"MLP": {1: 0.9, 2: 0.8, 4: 0.7}, "CNN": {1: 0.95, 4: 0.5}}, chance=0.1)
    lines = ax.get_lines()
    assert [l.get_label() for l in lines] == ["MLP", "CNN", "chance"]
    assert list(lines[1].get_xdata()) == [1, 4] and list(lines[1].get_ydata()) == [0.95, 0.5]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["1", "2", "4"]
    plt.close("all")


def test_plot_loss_curves_uses_history_records():
    hist = [{"step": 10, "loss": 2.0, "lr": 1e-3}, {"step": 20, "loss": 1.0, "lr": 1e-3}]
    ax = mux.plots.plot_loss_curves({"N=2": hist})
    assert list(ax.get_lines()[0].get_xdata()) == [10, 20]
    plt.close("all")


@pytest.mark.parametrize("shape", [(5, 1, 8, 8), (3, 3, 8, 8), (4, 8, 8)])
def test_show_images_one_panel_per_image(shape):
    fig = mux.plots.show_images(torch.rand(*shape), [str(i) for i in range(shape[0])], ncols=2)
    visible = [ax for ax in fig.axes if ax.images]
    assert len(visible) == shape[0] and visible[0].get_title() == "0"
    plt.close("all")


def test_pick_device_rejects_missing_cuda():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ValueError, match="CUDA is not available; use 'auto' or 'cpu'"):
        mux.pick_device("cuda")
