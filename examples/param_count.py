"""Counts the parameters of the BN lecture's MNIST CNN, with and without BN.

Run:
    python examples/param_count.py

It prints ``model.summary()`` of the CNN with ``kerasbn.BatchNorm``
(Total 38,910 = Trainable 38,650 + Non-trainable 260), the same model
without BN (38,390), and why a BN layer costs so little: 4 numbers per
channel, of which only gamma and beta are trained.
"""

from __future__ import annotations

import keras
from lecture_cnn import build_lecture_cnn

import kerasbn


def layer_counts(model: keras.Model) -> list[tuple[str, int, int]]:
    """Lists the layers that hold parameters.

    Args:
        model: A built model.

    Returns:
        ``(layer name, trainable count, non-trainable count)`` per layer,
        in order, for the layers with at least one parameter.
    """
    rows = []
    for layer in model.layers:
        trainable = sum(int(w.numpy().size) for w in layer.trainable_weights)
        frozen = sum(int(w.numpy().size) for w in layer.non_trainable_weights)
        if trainable + frozen:
            rows.append((layer.name, trainable, frozen))
    return rows


def print_counts(model: keras.Model) -> None:
    """Prints the per-layer and total counts of ``model`` as plain text.

    Args:
        model: A built model.
    """
    rows = layer_counts(model)
    print(f"\nParameters of {model.name} by layer:")
    print(f"  {'layer':<24}{'params':>10}{'trainable':>12}{'non-trainable':>15}")
    for name, trainable, frozen in rows:
        print(f"  {name:<24}{trainable + frozen:>10,}{trainable:>12,}{frozen:>15,}")
    per_layer = " / ".join(f"{t + f:,}" for _, t, f in rows)
    print(f"Per-layer parameters: {per_layer}")


def main() -> None:
    """Prints both summaries and the explanation."""
    with_bn = build_lecture_cnn(batch_norm=True)
    with_bn.summary()
    print_counts(with_bn)

    without_bn = build_lecture_cnn(batch_norm=False)
    print("\nThe same CNN without BN:")
    without_bn.summary()
    print_counts(without_bn)

    extra = with_bn.count_params() - without_bn.count_params()
    big = kerasbn.BatchNorm()
    big.build((None, 150, 150, 64))
    print(
        f"""
Why so few: BN adds {extra:,} parameters to this CNN. Each BN layer holds 4
numbers per channel C: gamma and beta (trainable, learned by backprop) and the
moving mean and moving variance (non-trainable, updated as running averages
in training and used at inference). The three BN layers here normalize
10 + 20 + 100 = 130 channels: 2 x 130 = 260 trainable and 2 x 130 = 260
non-trainable numbers, which is the whole "Non-trainable params" line above.

The statistics are per channel, shared over the batch and all spatial
positions. A BN after a conv whose output is 150x150x64 therefore holds
4 x 64 = {big.count_params():,} numbers (measured on kerasbn.BatchNorm built
for that shape), not 4 x 150 x 150 x 64 = {4 * 150 * 150 * 64:,}."""
    )


if __name__ == "__main__":
    main()
