"""The keras_hub model zoo of kerasbn's keras_hub suite: every keras_hub 0.32
backbone and task family that holds batch norm, at its smallest config.

Each :class:`Entry` builds its model from the constructor (random weights,
seeded, no preset: nothing is downloaded), channels_last, on a
``SIDE x SIDE x 3`` input, and gives a deterministic NumPy input batch for it.
Where a family has a task, it has two entries: the backbone and the task
(``<Family>Backbone`` and ``<Family><Task>``).

``DEFAULT`` is the subset the suite runs by default; ``KERASBN_KERAS_HUB=all``
selects every entry (:data:`ALL`) and ``KERASBN_KERAS_HUB=ResNetBackbone,...``
the ones named (see :func:`selected`).

Families whose batch norms are only inside custom layers' attributes (not
nodes of any functional graph) are the hard case of the tools: see
:func:`graph_batch_norms` and :func:`batch_norms`.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable

import keras
import numpy as np

SIDE = 64
BATCH = 4
NUM_CLASSES = 3


def images(side: int = SIDE, batch: int = BATCH, seed: int = 0) -> np.ndarray:
    """A seeded batch of images in [0, 1), channels_last."""
    rng = np.random.default_rng(seed)
    return rng.uniform(0.0, 1.0, (batch, side, side, 3)).astype("float32")


@dataclasses.dataclass(frozen=True)
class Entry:
    """One keras_hub model of the suite.

    Attributes:
        name: the entry's name, e.g. ``"ResNetBackbone"``.
        constructor: builds the model from its constructor (unseeded).
        inputs: ``inputs()`` is the model's input batch (seeded NumPy).
        skip: backend name -> why the entry cannot run there (a keras_hub bug).
        keras_failures: check -> why Keras's own machinery fails it on this
            entry (``"from_config"``, ``"keras_file"``): the suite's reference
            for that check does not exist, so kerasbn's is expected to fail.
        before_top_k: where the model gathers its results by a top-k over
            scores (D-FINE keeps its best anchors as queries), the keys of
            its backbone's output dict computed before that selection. With
            random weights those scores tie to float rounding, so any
            evaluation in another order (kerasbn's kernels, a fold) may pick
            other anchors and move every later output by O(1); the suite
            then compares these outputs (see :meth:`outputs`).
    """

    name: str
    constructor: Callable[[], keras.Model]
    inputs: Callable[[], np.ndarray | dict] = images
    skip: dict[str, str] = dataclasses.field(default_factory=dict)
    keras_failures: dict[str, str] = dataclasses.field(default_factory=dict)
    before_top_k: tuple[str, ...] = ()

    def build(self) -> keras.Model:
        """The model, with the same random weights in every run."""
        keras.utils.set_random_seed(0)
        return self.constructor()

    def outputs(self, model: keras.Model, x, training: bool):
        """What the suite compares: ``model(x, training=training)``, or for
        an entry with ``before_top_k``, those outputs of its backbone (the
        model itself, or a task's ``backbone``), which hold every BN."""
        if not self.before_top_k:
            return model(x, training=training)
        backbone = model.backbone if isinstance(model, hub().Task) else model
        outputs = backbone(x, training=training)
        return {key: outputs[key] for key in self.before_top_k}

    def skip_reason(self, backend: str | None = None) -> str | None:
        """Why the entry does not run on ``backend`` (the active one if None)."""
        return self.skip.get(backend or keras.backend.backend())


# --- what the suite counts --------------------------------------------------


def batch_norms(model: keras.Layer) -> list[keras.layers.BatchNormalization]:
    """Every Keras BN layer at any depth: graph nodes and custom layers'
    attributes, each once."""
    return [
        layer
        for layer in model._flatten_layers(include_self=False, recursive=True)
        if isinstance(layer, keras.layers.BatchNormalization)
    ]


def graph_batch_norms(model: keras.Layer) -> list[keras.layers.BatchNormalization]:
    """The BN layers that are nodes of a functional graph: of ``model``'s own,
    or of a functional model that is a node of it, at any depth. The other BN
    layers of :func:`batch_norms` live only inside custom layers."""
    found = []
    for operation in getattr(model, "operations", []):
        if isinstance(operation, keras.layers.BatchNormalization):
            found.append(operation)
        elif isinstance(operation, keras.Model):
            found.extend(graph_batch_norms(operation))
    return list({id(layer): layer for layer in found}.values())


def build_and_describe(entry: Entry) -> tuple[keras.Model, dict]:
    """Builds ``entry``; returns the model and its figures: class, BN layers at
    any depth and as graph nodes, weights (variables), build time in seconds."""
    start = time.perf_counter()
    model = entry.build()
    seconds = time.perf_counter() - start
    return model, {
        "class": type(model).__name__,
        "bn": len(batch_norms(model)),
        "bn_graph": len(graph_batch_norms(model)),
        "weights": len(model.weights),
        "build_s": seconds,
    }


# --- the models -------------------------------------------------------------


def hub():
    """``keras_hub.models``, imported only when a model is built."""
    import keras_hub

    return keras_hub.models


def resnet(stages: int = 2, image_shape=(SIDE, SIDE, 3)) -> keras.Model:
    """A ResNet of ``stages`` one-block stages: pyramid outputs P2 to
    P(stages + 1). keras_hub requires 64 filters of the stem and first stage;
    the others have 8. One stage builds too; the entry has two, so that its
    ``pyramid_outputs`` has more than one level."""
    return hub().ResNetBackbone(
        input_conv_filters=[64],
        input_conv_kernel_sizes=[3],
        stackwise_num_filters=[64] + [8] * (stages - 1),
        stackwise_num_blocks=[1] * stages,
        stackwise_num_strides=[1] + [2] * (stages - 1),
        block_type="basic_block",
        image_shape=image_shape,
    )


def hgnetv2(stages: int = 1, out_features=None) -> keras.Model:
    """An HGNetV2 of ``stages`` one-block stages of 8 to 16 filters."""
    filters = [8 * 2**i for i in range(stages + 1)]
    return hub().HGNetV2Backbone(
        depths=[1] * stages,
        embedding_size=8,
        hidden_sizes=filters[1:],
        stem_channels=[3, 8, 8],
        hidden_act="relu",
        use_learnable_affine_block=False,
        stackwise_stage_filters=[
            (filters[i], 8, filters[i + 1], 1, 1, 3) for i in range(stages)
        ],
        apply_downsample=[False] + [True] * (stages - 1),
        use_lightweight_conv_block=[False] * stages,
        image_shape=(SIDE, SIDE, 3),
        out_features=out_features,
    )


def cspnet() -> keras.Model:
    return hub().CSPNetBackbone(
        stem_filters=8,
        stem_kernel_size=3,
        stem_strides=2,
        stackwise_depth=[1],
        stackwise_strides=[2],
        stackwise_num_filters=[16],
        block_type="dark_block",
        stage_type="dark",
        image_shape=(SIDE, SIDE, 3),
    )


def densenet() -> keras.Model:
    return hub().DenseNetBackbone(
        stackwise_num_repeats=[1], growth_rate=8, image_shape=(SIDE, SIDE, 3)
    )


def efficientnet() -> keras.Model:
    return hub().EfficientNetBackbone(
        stackwise_width_coefficients=[1.0],
        stackwise_depth_coefficients=[1.0],
        stackwise_kernel_sizes=[3],
        stackwise_num_repeats=[1],
        stackwise_input_filters=[8],
        stackwise_output_filters=[8],
        stackwise_expansion_ratios=[2],
        stackwise_squeeze_and_excite_ratios=[0.25],
        stackwise_strides=[1],
        stackwise_block_types=["unfused"],
        stackwise_force_input_filters=[0],
        stackwise_nores_option=[False],
        num_features=16,
        input_shape=(SIDE, SIDE, 3),
    )


def mobilenet() -> keras.Model:
    return hub().MobileNetBackbone(
        stackwise_expansion=[[16]],
        stackwise_num_blocks=[1],
        stackwise_num_filters=[[8]],
        stackwise_kernel_size=[[3]],
        stackwise_num_strides=[[2]],
        stackwise_se_ratio=[[0.25]],
        stackwise_activation=[["relu"]],
        stackwise_padding=[[1]],
        output_num_filters=16,
        depthwise_filters=8,
        depthwise_stride=2,
        depthwise_residual=False,
        last_layer_filter=16,
        input_num_filters=8,
        image_shape=(SIDE, SIDE, 3),
    )


def mobilenetv5() -> keras.Model:
    from keras_hub.src.models.mobilenetv5.mobilenetv5_builder import (
        convert_arch_def_to_stackwise,
    )

    # An edge-residual stage, then a universal-inverted-residual block and a
    # multi-query attention block: each of the three holds BN of its own.
    stacks = [
        ["er_r1_k3_s2_e2_c8"],
        ["uir_r1_a3_k0_s1_e2_c8", "mqa_r1_k3_h1_v2_s1_d8_c8"],
    ]
    # With BN as its norm layer (the default is RMS norm), and the multi-scale
    # fusion adapter on: without it, keras_hub 0.32's MobileNetV5ImageClassifier
    # gives its head's BN axis=None (TypeError in BatchNormalization).
    return hub().MobileNetV5Backbone(
        **convert_arch_def_to_stackwise(stacks),
        stem_size=8,
        num_features=16,
        msfa_output_resolution=4,
        norm_layer="batch_norm",
        image_shape=(SIDE, SIDE, 3),
    )


def xception() -> keras.Model:
    return hub().XceptionBackbone(
        stackwise_conv_filters=[[8, 16]],
        stackwise_pooling=[False],
        image_shape=(SIDE, SIDE, 3),
    )


def deeplabv3() -> keras.Model:
    return hub().DeepLabV3Backbone(
        image_encoder=resnet(3),
        low_level_feature_key="P2",
        spatial_pyramid_pooling_key="P4",
        upsampling_size=4,
        dilation_rates=[2],
        projection_filters=8,
        image_shape=(SIDE, SIDE, 3),
    )


def retinanet() -> keras.Model:
    return hub().RetinaNetBackbone(
        image_encoder=resnet(3),
        min_level=3,
        max_level=4,
        use_p5=False,
        use_fpn_batch_norm=True,
        image_shape=(SIDE, SIDE, 3),
    )


def basnet() -> keras.Model:
    # keras_hub requires an encoder of 4 stages with an unknown image size.
    return hub().BASNetBackbone(
        image_encoder=resnet(4, image_shape=(None, None, 3)),
        num_classes=1,
        image_shape=(SIDE, SIDE, 3),
    )


def segformer() -> keras.Model:
    encoder = hub().MiTBackbone(
        layerwise_depths=[1],
        num_layers=1,
        layerwise_num_heads=[1],
        layerwise_sr_ratios=[1],
        max_drop_path_rate=0.0,
        layerwise_patch_sizes=[3],
        layerwise_strides=[4],
        hidden_dims=[8],
        image_shape=(SIDE, SIDE, 3),
    )
    return hub().SegFormerBackbone(image_encoder=encoder, projection_filters=8)


def dfine() -> keras.Model:
    return hub().DFineBackbone(
        backbone=hgnetv2(2, out_features=["stage1", "stage2"]),
        decoder_in_channels=[16, 16],
        encoder_hidden_dim=16,
        num_labels=NUM_CLASSES,
        num_denoising=0,
        learn_initial_query=False,
        num_queries=8,
        anchor_image_size=(SIDE, SIDE),
        feat_strides=[8, 16],
        num_feature_levels=2,
        hidden_dim=16,
        encoder_in_channels=[16, 32],
        encode_proj_layers=[1],
        num_attention_heads=2,
        encoder_ffn_dim=16,
        num_encoder_layers=1,
        hidden_expansion=0.5,
        depth_multiplier=0.5,
        eval_idx=-1,
        num_decoder_layers=1,
        decoder_attention_heads=2,
        decoder_ffn_dim=16,
        decoder_n_points=[2, 2],
        lqe_hidden_dim=8,
        num_lqe_layers=1,
        out_features=["stage1", "stage2"],
        image_shape=(SIDE, SIDE, 3),
        seed=0,
    )


def task(name: str, backbone: Callable[[], keras.Model], **kwargs):
    """A zero-argument builder of the task ``keras_hub.models.<name>`` on a
    fresh ``backbone()``."""
    return lambda: getattr(hub(), name)(backbone=backbone(), **kwargs)


CLASSES = {"num_classes": NUM_CLASSES}
# family: (backbone builder, task class name, task keyword arguments)
FAMILIES = {
    "ResNet": (resnet, "ResNetImageClassifier", CLASSES),
    "CSPNet": (cspnet, "CSPNetImageClassifier", CLASSES),
    "DenseNet": (densenet, "DenseNetImageClassifier", CLASSES),
    "EfficientNet": (efficientnet, "EfficientNetImageClassifier", CLASSES),
    "HGNetV2": (hgnetv2, "HGNetV2ImageClassifier", {"preprocessor": None, **CLASSES}),
    "MobileNet": (
        mobilenet,
        "MobileNetImageClassifier",
        {"num_features": 16, **CLASSES},
    ),
    "MobileNetV5": (
        mobilenetv5,
        "MobileNetV5ImageClassifier",
        {"head_hidden_size": 16, **CLASSES},
    ),
    "Xception": (xception, "XceptionImageClassifier", CLASSES),
    "DeepLabV3": (deeplabv3, "DeepLabV3ImageSegmenter", CLASSES),
    "RetinaNet": (
        retinanet,
        "RetinaNetObjectDetector",
        {"pre_logits_num_conv_layers": 1, **CLASSES},
    ),
    "BASNet": (basnet, "BASNetImageSegmenter", {}),
    "SegFormer": (segformer, "SegFormerImageSegmenter", CLASSES),
    "DFine": (dfine, "DFineObjectDetector", CLASSES),
}

# What Keras's own machinery fails on, by family, with keras 3.15.1 and
# keras_hub 0.32.0 on all three backends (benchmarks/keras_hub_table.py).
KERAS_FAILURES = {
    "EfficientNet": {
        "keras_file": "load_model of its .keras file raises 'A total of 2 objects "
        "could not be loaded' (top_conv, top_bn: 'expected 1 variables, but "
        "received 0'), whatever the blocks and stages",
    },
}


# Outputs computed before a top-k selection (see Entry.before_top_k): D-FINE's
# encoder scores its anchors, then keeps the best as the decoder's queries.
BEFORE_TOP_K = {
    "DFine": (
        "encoder_last_hidden_state",
        "encoder_hidden_states",
        "enc_outputs_class",
        "enc_outputs_coord_logits",
    ),
}


def family_entries(family: str) -> tuple[Entry, Entry]:
    """``family``'s backbone entry and task entry."""
    backbone, task_name, task_kwargs = FAMILIES[family]
    shared = {
        "keras_failures": KERAS_FAILURES.get(family, {}),
        "before_top_k": BEFORE_TOP_K.get(family, ()),
    }
    return (
        Entry(f"{family}Backbone", backbone, **shared),
        Entry(task_name, task(task_name, backbone, **task_kwargs), **shared),
    )


ENTRIES = {e.name: e for family in FAMILIES for e in family_entries(family)}
ALL = tuple(ENTRIES)

# The default run, the cheapest entries that together cover the three ways
# keras_hub holds BN: ResNetBackbone, a functional Backbone whose BN are graph
# nodes and which has pyramid_outputs; EfficientNetImageClassifier, a Task
# with a backbone, some of whose BN live inside custom layers that create
# their weights only on their first call; HGNetV2Backbone, whose BN all live
# inside custom layers (none is a graph node).
DEFAULT = ("ResNetBackbone", "EfficientNetImageClassifier", "HGNetV2Backbone")


def selected(names: str | None = None) -> list[Entry]:
    """The entries named in ``KERASBN_KERAS_HUB`` (``all`` for every one; comma
    separated names otherwise), else :data:`DEFAULT`. ``names`` overrides the
    environment variable."""
    if names is None:
        names = os.environ.get("KERASBN_KERAS_HUB", "")
    if not names:
        chosen = list(DEFAULT)
    elif names == "all":
        chosen = list(ALL)
    else:
        chosen = [name.strip() for name in names.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(ENTRIES))
    if unknown:
        raise ValueError(
            f"KERASBN_KERAS_HUB names unknown entries {unknown}; "
            f"known: {sorted(ENTRIES)} or all."
        )
    return [ENTRIES[name] for name in chosen]
