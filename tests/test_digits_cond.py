"""The class-conditional DDIM UNet (Model.num_classes) and its bundled digits model: an unconditional config builds
the same network as before, the class embedding is a vector added to the time embedding, training sees the
digits' labels with 10% replaced by the null class, and the shipped weights make the digit they are asked for."""

import copy
import os

import numpy as np
import pytest
import torch

import pndm_fast
from pndm_fast import UserError, load_config
from pndm_fast.data import load_dataset
from digits_classifier import load_classifier
from pndm_fast.images import to_uint8
from pndm_fast.models import build_model, load_checkpoint
from pndm_fast.runners.sample import resolve_model_path
from pndm_fast.runners.train import STREAM_INIT, drop_labels, train
from pndm_fast.sampling import sample
from pndm_fast.schedule import Schedule
from pndm_fast.seeds import derived_seed

WEIGHTS = os.path.join(os.path.dirname(pndm_fast.__file__), "weights")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class WithLabels(torch.nn.Module):
    """The conditional UNet as the (x, t) model pndm_fast.sample calls, for fixed labels."""

    def __init__(self, net, labels):
        super().__init__()
        self.net, self.labels = net, labels

    def forward(self, x, t):
        return self.net(x, t, y=self.labels)


def test_unconditional_configs_build_the_same_network():
    """num_classes absent or 0: the shipped digits checkpoint (trained before the option existed) loads with
    strict keys, and the conditional model has exactly one key more."""
    plain = build_model(load_config("digits"))
    load_checkpoint(plain, os.path.join(WEIGHTS, "digits.safetensors"))
    zero = copy.deepcopy(load_config("digits"))
    zero["Model"]["num_classes"] = 0
    assert list(build_model(zero).state_dict()) == list(plain.state_dict())
    cond = build_model(load_config("digits-cond")).state_dict()
    assert set(cond) - set(plain.state_dict()) == {"class_emb.weight"}
    assert cond["class_emb.weight"].shape == (11, 128)  # 10 digits + the null class, 4 x ch wide


def test_class_embedding_is_added_to_the_time_embedding():
    """model(x, t, y) equals the same model without a class embedding whose last time-embedding bias carries
    class y's vector: the embedding is added after the time MLP, nowhere else."""
    torch.manual_seed(0)
    net = build_model(load_config("digits-cond")).eval()
    x, t = torch.randn(3, 1, 16, 16), torch.tensor([5.0, 300.0, 900.0])
    plain = build_model(load_config("digits")).eval()
    state = {k: v for k, v in net.state_dict().items() if k != "class_emb.weight"}
    for label in (0, 7, 10):
        shifted = dict(state)
        shifted["temb.dense.1.bias"] = state["temb.dense.1.bias"] + net.class_emb.weight[label].detach()
        plain.load_state_dict(shifted)
        with torch.no_grad():
            expected = plain(x, t)
            got = net(x, t, torch.full((3,), label))
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert torch.equal(net(x, t), net(x, t, torch.full((3,), 10)))  # None is the null class
        assert not torch.allclose(net(x, t, torch.tensor([0, 0, 0])), net(x, t, torch.tensor([1, 1, 1])))


def test_bad_labels_are_refused():
    net = build_model(load_config("digits-cond")).eval()
    x, t = torch.randn(2, 1, 16, 16), torch.tensor([5.0, 6.0])
    with pytest.raises(ValueError, match="LongTensor of shape"):
        net(x, t, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="LongTensor of shape"):
        net(x, t, torch.tensor([1]))
    with pytest.raises(IndexError):
        net(x, t, torch.tensor([3, 11]))
    with pytest.raises(ValueError, match="no class embedding"):
        build_model(load_config("digits"))(x, t, torch.tensor([1, 2]))
    bad = copy.deepcopy(load_config("digits-cond"))
    bad["Model"]["num_classes"] = -1
    with pytest.raises(UserError, match="Model.num_classes"):
        build_model(bad)
    iddpm = copy.deepcopy(load_config("iddpm-cifar10"))
    iddpm["Model"]["num_classes"] = 10
    with pytest.raises(UserError, match="Model.num_classes"):
        build_model(iddpm)


def test_digits_carry_their_labels():
    from sklearn.datasets import load_digits

    config = load_config("digits-cond")
    labelled, plain = load_dataset(config, labels=True), load_dataset(config)
    image, label = labelled[17]
    assert torch.equal(image, plain[17]) and int(label) == int(load_digits().target[17])
    assert torch.equal(labelled.labels, torch.from_numpy(load_digits().target).long())
    folder = copy.deepcopy(config)
    folder["Dataset"]["dataset"] = "folder"
    with pytest.raises(UserError, match="needs a dataset with class labels"):
        load_dataset(folder, "/nonexistent", labels=True)


def test_label_dropout_replaces_a_tenth_by_the_null_class():
    labels = torch.arange(20000) % 10
    dropped = drop_labels(labels, torch.Generator().manual_seed(0), 0.1, 10)
    share = float((dropped == 10).double().mean())
    assert abs(share - 0.1) < 4 * (0.1 * 0.9 / 20000) ** 0.5  # 4 standard deviations of a binomial share
    kept = dropped != 10
    assert torch.equal(dropped[kept], labels[kept])
    # a batch split over processes: each rank's rows get the coins one process would toss for them
    rows = slice(5000, 10000)
    part = drop_labels(labels[rows], torch.Generator().manual_seed(0), 0.1, 10, batch=20000, rows=rows)
    assert torch.equal(part, dropped[rows])


def test_conditional_training_runs_and_learns_the_class_embedding(tmp_path):
    config = copy.deepcopy(load_config("digits-cond"))
    config["Dataset"].update(image_size=8, batch_size=16)
    config["Model"].update(image_size=8, attn_resolutions=[4])
    config["Train"].update(save_every=1000, ema_rate=0.0)
    with torch.random.fork_rng():
        torch.manual_seed(derived_seed(0, STREAM_INIT, 0))  # the initial weights train() draws for seed 0
        before = build_model(config).state_dict()["class_emb.weight"]
    summary = train(config, str(tmp_path), max_steps=3, progress=False)
    assert summary["step"] == 3 and np.isfinite(summary["losses"]).all()
    trained = torch.load(tmp_path / "train_state.pt", weights_only=True)["model"]["class_emb.weight"]
    assert trained.shape == before.shape and not torch.equal(trained, before)
    bad = copy.deepcopy(config)
    bad["Model"]["num_classes"] = 5
    with pytest.raises(UserError, match="labels up to 9"):
        train(bad, str(tmp_path / "bad"), max_steps=1, progress=False)
    bad = copy.deepcopy(config)
    bad["Train"]["label_dropout"] = 1.5
    with pytest.raises(UserError, match="Train.label_dropout"):
        train(bad, str(tmp_path / "bad2"), max_steps=1, progress=False)


def test_shipped_model_makes_the_asked_digit():
    """40 digits per class (F-PNDM, 20 steps, guidance 1), named by the shipped classifier: the asked class
    wins for every label. benchmarks/digits_cond_classes.py measures the shares on more samples."""
    config = load_config("digits-cond")
    net = build_model(config).eval()
    load_checkpoint(net, resolve_model_path(None, config))
    classifier, schedule = load_classifier(), Schedule.from_config(config["Schedule"])
    per_class = 40
    labels = torch.arange(10).repeat_interleave(per_class)
    noise = torch.randn(len(labels), 1, 16, 16, generator=torch.Generator().manual_seed(0))
    x = sample(WithLabels(net, labels), noise, schedule, method="F-PNDM", sample_step=20, backend="torch")
    pixels = torch.from_numpy(to_uint8(x)).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        got = classifier(pixels).argmax(1)
    shares = (got == labels).view(10, per_class).double().mean(1)
    assert shares.min() >= 0.8, shares  # chance is 0.1; measured 0.95 to 1.0 per class at 100 per class
    assert shares.mean() >= 0.9, shares
