"""Porting a PyTorch ResNet-18 to Keras with kerasbn: eval and one training step.

A ResNet-18 in torchvision's layout (``conv1``, ``bn1``, ``maxpool``,
``layer1`` to ``layer4`` of two ``BasicBlock``s, ``avgpool``, ``fc``) is
written here in plain ``torch.nn``, with random weights and running statistics
from a few training-mode passes. It is ported to a channels-last Keras model:
convolutions and the classifier by copying their weights, and each of its 20
``BatchNorm2d`` by ``kerasbn.from_torch`` (momentum ``1 - m``, epsilon 1e-5,
torch's unbiased running variance). Then both take one SGD step on the same
batch, and the script prints how far apart they are: eval logits before and
after the step, the step's loss, every BN's running mean and variance, and
the weights.

In float32, a step's weights can differ by more than rounding where rounding
flips a discrete choice (a ReLU at 0, a near-tie in a max pool); the script
also prints how far torch's own float32 step is from its float64 one, and
``--dtype float64`` runs both models in float64 (on JAX, with
``JAX_ENABLE_X64=1`` in the environment).

Run:
    python examples/port_torch_resnet18.py
    python examples/port_torch_resnet18.py --dtype float64
    python examples/port_torch_resnet18.py --size 32 --batch-size 4   # quicker

Example:
    >>> from port_torch_resnet18 import parse_args  # doctest: +SKIP
    >>> parse_args([]).size  # doctest: +SKIP
    64
"""

from __future__ import annotations

import argparse
import copy

import keras
import numpy as np
import torch
from torch import nn

import kerasbn


# --------------------------------------------------------------- the torch model
class BasicBlock(nn.Module):
    """torchvision's ResNet basic block: two 3x3 convolutions and a shortcut."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes, 1, stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class ResNet18(nn.Module):
    """torchvision's ``resnet18`` layout, written out."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        widths = [(64, 64, 1), (64, 128, 2), (128, 256, 2), (256, 512, 2)]
        for i, (inplanes, planes, stride) in enumerate(widths, 1):
            blocks = [BasicBlock(inplanes, planes, stride), BasicBlock(planes, planes)]
            setattr(self, f"layer{i}", nn.Sequential(*blocks))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(1, 5):
            x = getattr(self, f"layer{i}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


# ------------------------------------------------------------------- the port
class Port:
    """Builds the Keras model layer by layer, remembering which torch module
    each Keras layer came from."""

    def __init__(self):
        self.pairs: list[tuple[str, nn.Module, keras.layers.Layer]] = []

    def conv(self, x, name: str, module: nn.Conv2d):
        if module.padding[0]:
            x = keras.layers.ZeroPadding2D(module.padding[0])(x)
        layer = keras.layers.Conv2D(
            module.out_channels,
            module.kernel_size,
            strides=module.stride,
            use_bias=False,
            name=name.replace(".", "_"),
        )
        x = layer(x)
        # torch (out, in, kh, kw) -> Keras (kh, kw, in, out)
        layer.set_weights([module.weight.detach().permute(2, 3, 1, 0).numpy()])
        self.pairs.append((name, module, layer))
        return x

    def bn(self, x, name: str, module: nn.BatchNorm2d):
        layer = kerasbn.from_torch(module)  # channels last
        self.pairs.append((name, module, layer))
        return layer(x)

    def block(self, x, name: str, block: BasicBlock):
        identity = x
        if block.downsample is not None:
            identity = self.conv(x, f"{name}.downsample.0", block.downsample[0])
            identity = self.bn(identity, f"{name}.downsample.1", block.downsample[1])
        out = self.conv(x, f"{name}.conv1", block.conv1)
        out = keras.layers.ReLU()(self.bn(out, f"{name}.bn1", block.bn1))
        out = self.bn(
            self.conv(out, f"{name}.conv2", block.conv2), f"{name}.bn2", block.bn2
        )
        return keras.layers.ReLU()(keras.layers.Add()([out, identity]))

    def resnet(self, model: ResNet18, size: int) -> keras.Model:
        inputs = keras.Input((size, size, 3))
        x = self.conv(inputs, "conv1", model.conv1)
        x = keras.layers.ReLU()(self.bn(x, "bn1", model.bn1))
        # torch pads the max pool with -inf; after a ReLU, zeros are the same.
        x = keras.layers.MaxPooling2D(3, 2)(keras.layers.ZeroPadding2D(1)(x))
        for i in range(1, 5):
            for j, block in enumerate(getattr(model, f"layer{i}")):
                x = self.block(x, f"layer{i}.{j}", block)
        x = keras.layers.GlobalAveragePooling2D()(x)
        fc = keras.layers.Dense(model.fc.out_features, name="fc")
        outputs = fc(x)
        fc.set_weights(
            [model.fc.weight.detach().T.numpy(), model.fc.bias.detach().numpy()]
        )
        self.pairs.append(("fc", model.fc, fc))
        return keras.Model(inputs, outputs)


# ------------------------------------------------------------------ comparing
def nhwc(x: np.ndarray) -> np.ndarray:
    return np.moveaxis(x, 1, -1)


def largest(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, "f8") - np.asarray(b, "f8"))))


def relative(a, b) -> float:
    return largest(a, b) / float(np.max(np.abs(np.asarray(b, "f8"))))


def compare_statistics(port: Port) -> dict[str, tuple[float, str]]:
    """The largest relative gap of each running statistic, and its BN's name."""
    worst = {"running_mean": (0.0, ""), "running_var": (0.0, "")}
    for name, module, layer in port.pairs:
        if not isinstance(module, nn.BatchNorm2d):
            continue
        for key, ours in (
            ("running_mean", layer.moving_mean),
            ("running_var", layer.moving_variance),
        ):
            gap = relative(
                keras.ops.convert_to_numpy(ours), getattr(module, key).numpy()
            )
            worst[key] = max(worst[key], (gap, name))
    return worst


def compare_weights(port: Port, reference: nn.Module | None = None) -> float:
    """The largest relative gap of a trained weight (conv kernels, fc, gamma,
    beta) from the torch model's, or from those of ``reference``, a copy of it."""
    if reference is not None:
        modules = dict(reference.named_modules())
    gaps = []
    for name, module, layer in port.pairs:
        if reference is not None:
            module = modules[name]
        if isinstance(module, nn.BatchNorm2d):
            theirs = [module.weight, module.bias]
            ours = [layer.gamma, layer.beta]
        elif isinstance(module, nn.Conv2d):
            theirs, ours = [module.weight.permute(2, 3, 1, 0)], [layer.kernel]
        else:
            theirs, ours = [module.weight.T, module.bias], [layer.kernel, layer.bias]
        for t, o in zip(theirs, ours):
            gaps.append(relative(keras.ops.convert_to_numpy(o), t.detach().numpy()))
    return max(gaps)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=64, help="image height and width")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    keras.config.set_floatx(args.dtype)
    torch.set_default_dtype(getattr(torch, args.dtype))
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    shape = (args.batch_size, 3, args.size, args.size)
    x = rng.normal(size=shape).astype(args.dtype)
    labels = rng.integers(0, 10, args.batch_size)

    model = ResNet18()
    with torch.no_grad():  # running statistics of a few batches, not 0 and 1
        for _ in range(3):
            model(torch.from_numpy(rng.normal(0.5, 2.0, shape).astype(args.dtype)))
    port = Port()
    keras_model = port.resnet(model, args.size)
    bn_count = sum(isinstance(m, nn.BatchNorm2d) for _, m, _ in port.pairs)

    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(x)).numpy()
    figures = {
        "eval logits before the step": largest(
            keras_model.predict(nhwc(x), verbose=0), logits
        )
    }

    # One SGD step on the same batch, in training mode; a float64 copy of the
    # torch model takes it too, to show how far float32 rounding alone goes.
    reference = copy.deepcopy(model).double()
    for net, inputs in ((model, x), (reference, x.astype("f8"))):
        net.train()
        optimizer = torch.optim.SGD(net.parameters(), lr=args.learning_rate)
        loss = nn.functional.cross_entropy(
            net(torch.from_numpy(inputs)), torch.from_numpy(labels)
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if net is model:
            torch_loss = float(loss.detach())
    keras_model.compile(
        keras.optimizers.SGD(args.learning_rate),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    keras_loss = keras_model.train_on_batch(nhwc(x), labels)
    figures["training loss of the step"] = abs(float(keras_loss) - torch_loss)
    statistics = compare_statistics(port)
    figures["running mean after the step (relative)"] = statistics["running_mean"][0]
    figures["running variance after the step (relative)"] = statistics["running_var"][0]
    figures["weights after the step (relative)"] = compare_weights(port)
    figures["weights after the step, kerasbn vs torch float64 (relative)"] = (
        compare_weights(port, reference)
    )
    figures["weights after the step, torch vs its float64 copy (relative)"] = max(
        relative(p.detach().numpy(), q.detach().numpy())
        for p, q in zip(model.parameters(), reference.parameters())
    )
    model.eval()
    reference.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(x)).numpy()
        logits64 = reference(torch.from_numpy(x.astype("f8"))).numpy()
    figures["eval logits after the step"] = largest(
        keras_model.predict(nhwc(x), verbose=0), logits
    )
    figures["eval logits after the step, torch vs its float64 copy"] = largest(
        logits, logits64
    )

    print(
        f"ResNet-18 (torchvision layout), {bn_count} BatchNorm2d ported with "
        f"kerasbn.from_torch; input {shape} (NCHW in torch, NHWC in Keras), "
        f"{args.dtype}, Keras backend {keras.backend.backend()}; eval logits span "
        f"{float(np.ptp(logits)):.3g}"
    )
    for label, value in figures.items():
        print(f"{label}: {value:.3g}")
    print(
        f"largest running-variance gap in {statistics['running_var'][1]}, "
        f"running-mean gap in {statistics['running_mean'][1]}"
    )
    return figures


if __name__ == "__main__":
    main()
