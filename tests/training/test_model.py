import torch

from mnist_pipeline import model


def torchvision_resnet18_keys() -> set[str]:
    """The state_dict keys of torchvision.models.resnet18, spelled out from its structure."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys = {"conv1.weight", "fc.weight", "fc.bias"} | {f"bn1.{k}" for k in bn}
    for layer in range(1, 5):
        for block in range(2):
            p = f"layer{layer}.{block}"
            keys |= {f"{p}.conv1.weight", f"{p}.conv2.weight"}
            keys |= {f"{p}.bn1.{k}" for k in bn} | {f"{p}.bn2.{k}" for k in bn}
        if layer > 1:
            keys |= {f"layer{layer}.0.downsample.0.weight"}
            keys |= {f"layer{layer}.0.downsample.1.{k}" for k in bn}
    return keys


def test_parameter_count_is_resnet18_with_one_channel_and_ten_classes() -> None:
    net = model.build()
    assert sum(p.numel() for p in net.parameters()) == 11_175_370


def test_parameter_names_match_torchvision() -> None:
    state = model.build().state_dict()
    assert set(state) == torchvision_resnet18_keys()
    assert state["conv1.weight"].shape == (64, 1, 7, 7)
    assert state["layer4.1.conv2.weight"].shape == (512, 512, 3, 3)
    assert state["fc.weight"].shape == (10, 512)


def test_output_shape_for_a_batch_of_digits() -> None:
    net = model.build().eval()
    with torch.no_grad():
        assert net(torch.zeros(5, 1, 28, 28)).shape == (5, 10)


def test_checkpoint_round_trip_with_weights_only(tmp_path) -> None:
    net = model.build().eval()
    path = tmp_path / "model.pth"
    torch.save(model.checkpoint_payload(net, test_accuracy=0.5), path)
    rebuilt = model.from_checkpoint(torch.load(path, weights_only=True))
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), net(x))


def test_foreign_payload_is_refused() -> None:
    import pytest

    with pytest.raises(ValueError, match="not a resnet18 checkpoint"):
        model.from_checkpoint({"state_dict": {}})
    bad = model.checkpoint_payload(model.build())
    bad["state_dict"] = {"fc.weight": torch.zeros(2, 2)}
    with pytest.raises(ValueError, match="weights do not fit"):
        model.from_checkpoint(bad)
    # Keys missing or of the wrong type were a KeyError's traceback.
    for key, value in (("in_channels", None), ("num_classes", "10"), ("num_classes", 0)):
        odd = model.checkpoint_payload(model.build())
        odd[key] = value
        with pytest.raises(ValueError, match="in_channels and num_classes must be positive"):
            model.from_checkpoint(odd)


def test_training_convolutions_on_tiny_maps_match_the_plain_convolution() -> None:
    """The matrix-product path (2x2 and 1x1 maps, in training) computes what nn.Conv2d
    does, forward and backward, for every shape ResNet-18 gives it on 28x28 digits."""
    torch.manual_seed(0)
    # (in, out, map size, stride): layer3's 2x2 maps, layer4's 2x2 -> 1x1 and 1x1 maps.
    cases = [(256, 256, 2, 1), (256, 512, 2, 2), (512, 512, 1, 1)]
    for c_in, c_out, size, stride in cases:
        conv = model.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        assert model.all_seeing_taps(size, size, (3, 3), (stride, stride), (1, 1)) is not None
        x = torch.randn(4, c_in, size, size).contiguous(memory_format=torch.channels_last)
        outputs, grads = [], []
        for training in (True, False):
            conv.train(training)
            xi = x.clone().requires_grad_()
            conv.weight.grad = None
            y = conv(xi)
            y.pow(2).sum().backward()
            outputs.append(y)
            grads.append((xi.grad, conv.weight.grad))
        torch.testing.assert_close(outputs[0], outputs[1], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(grads[0], grads[1], atol=1e-3, rtol=1e-4)


def test_larger_maps_keep_the_plain_convolution() -> None:
    # layer3's first convolution: 4x4 -> 2x2, its corner outputs miss far input pixels.
    assert model.all_seeing_taps(4, 4, (3, 3), (2, 2), (1, 1)) is None
    assert model.all_seeing_taps(7, 7, (3, 3), (1, 1), (1, 1)) is None
    # layer4's 1x1 stride-2 downsample on 2x2 sees only the top-left pixel.
    assert model.all_seeing_taps(2, 2, (1, 1), (2, 2), (0, 0)) is None
