"""Walking Keras models: the one walker that every kerasbn tool uses.

A Keras 3 model is a tree of layers. Keras tracks every sub-layer that a layer
holds, whatever the holding: an attribute, a list, tuple or dict (nested too),
a layer created in ``build()``, the operations of a functional or Sequential
graph, a keras_hub ``Backbone`` inside its ``Task``. :func:`walk` visits that
whole tree, so a tool reaches a BN layer wherever a model holds it.

The tools change layers **in place**, on the layer objects themselves:

* :func:`transplant` turns a layer into another class's layer without
  replacing the object, so every holder of it (attributes, containers, graph
  nodes, other models sharing it) sees the change at once, and its name,
  variables and weight paths stay as they are;
* a tool that returns a new model first makes a true copy with
  :func:`copy_model` (a deep copy), and changes that.

Functional graphs hold operations, of which layers are one kind: a ``keras.ops``
call on a symbolic tensor (``x + 3.0``) is an operation node without weights.
:meth:`Graphs.sole_producer` reads the graph's nodes to find the Dense/Conv layer whose
output only a given BN consumes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import keras

from kerasbn import _keras_internals as internals
from kerasbn._copier import Copier, CopyError
from kerasbn.layer import BatchNorm

__all__ = [
    "BATCH_NORMS",
    "Graphs",
    "add_weight_in_place",
    "batch_norms",
    "build_like",
    "check_model",
    "compile_like",
    "copy_model",
    "forget_compiled_functions",
    "fresh_optimizer",
    "is_plain_graph",
    "keep_one_node_per_call",
    "models",
    "transplant",
    "walk",
    "without",
]

BATCH_NORMS = (BatchNorm, keras.layers.BatchNormalization)


def check_model(model, function: str, *needs: str) -> None:
    """Raises a clear error unless ``model`` is a ``keras.Model`` and this
    Keras has the internals that ``needs`` name (see
    :func:`kerasbn._keras_internals.require`)."""
    if not isinstance(model, keras.Model):
        raise ValueError(
            f"`{function}` needs a keras.Model (functional, Sequential or "
            f"subclassed); got {type(model).__name__} {getattr(model, 'name', model)!r}."
        )
    internals.require(function, model, *needs)


def walk(root) -> list[tuple[str, keras.layers.Layer]]:
    """Every layer of ``root``'s tree, ``root`` first, each once, with its path.

    The path joins the layers' names from ``root`` down, as Keras's weight
    paths do (``"model/block_1/bn"``). A layer held in several places (a
    shared layer) is listed once, at its first path. The tree is walked with
    a stack of its own, so a deep tree needs no deep recursion.
    """
    found: list[tuple[str, keras.layers.Layer]] = []
    seen: set[int] = set()
    stack = [(root.name, root)]
    while stack:
        path, layer = stack.pop()
        if id(layer) in seen:
            continue
        seen.add(id(layer))
        found.append((path, layer))
        children = internals.sublayers(layer)  # Keras's record of every sub-layer
        stack.extend((f"{path}/{child.name}", child) for child in reversed(children))
    return found


def batch_norms(root) -> list[tuple[str, keras.layers.Layer]]:
    """``(path, layer)`` of every BN layer (``kerasbn.BatchNorm`` or
    ``keras.layers.BatchNormalization``, subclasses included) in ``root``'s tree."""
    return [
        (path, layer) for path, layer in walk(root) if isinstance(layer, BATCH_NORMS)
    ]


def models(root) -> Iterator[keras.Model]:
    """Every ``keras.Model`` in ``root``'s tree, ``root`` first."""
    return (layer for _, layer in walk(root) if isinstance(layer, keras.Model))


def copy_model(model: keras.Model, function: str) -> keras.Model:
    """A true copy of ``model``: every object of its tree copied.

    Keras pickles (and so deep-copies) a model by saving and loading it,
    which gives unnamed layers new names and so new weight paths, and needs
    every class registered. Here every layer and model is copied as a plain
    Python object instead, attribute by attribute
    (:class:`kerasbn._copier.Copier` with Keras's rules from
    :func:`kerasbn._keras_internals.copy_rule`): the copy has the model's
    class, config and attributes, every layer (those off the output path
    too), the same layer names and weight paths, the state of lazily built
    layers and of metrics, and new variables with the same values. Per-call
    state (the losses of the last call) is not copied, nor are compiled
    train/test/predict functions: the next call compiles them anew. Each
    layer keeps only the graph nodes of the copy's own graphs.

    A compiled model's copy is compiled with copies of the objects its
    ``compile`` was given (losses and metrics of any kind, registered or not,
    functions or objects) and a new optimizer of the same class and config;
    the compile config is never serialized. Nothing outside the copy changes
    while it is made: no class, no ``copy`` module table, no recursion limit.

    Raises:
        ValueError: if ``model`` cannot be copied; the message names
            ``function``, the path of the object that failed, and the way to
            change the model in place instead.
    """
    copier = Copier(internals.copy_rule, describe=_describe)
    for optimizer in _optimizers(model):  # compiled anew (slots are keyed by id)
        copier.remember(optimizer, None)
    try:
        duplicate = copier.copy(model, f"{type(model).__name__} {model.name!r}")
        keep_one_node_per_call(duplicate)  # and new node keys (they hold ids)
        for _, layer in walk(duplicate):
            internals.rekey_torch_parameters(layer)
        for original, new in zip(models(model), models(duplicate)):
            compile_like(new, original, copier)
    except CopyError as error:
        raise ValueError(
            f"`{function}` works on a copy of the model, and {error}. Pass "
            "in_place=True to change the model itself."
        ) from error
    return duplicate


def _describe(obj) -> str | None:
    if isinstance(obj, keras.layers.Layer):
        kind = "model" if isinstance(obj, keras.Model) else "layer"
        return f"{kind} {getattr(obj, 'name', '?')!r}"
    return None


def _optimizers(root) -> list:
    """The optimizers of the compiled models of ``root``'s tree (a loss-scale
    optimizer's inner one too), as ``compile`` received and made them."""
    found = []
    for model in models(root):
        if not getattr(model, "compiled", False):
            continue
        candidates = [getattr(model, "optimizer", None)]
        candidates.append(internals.compile_arguments(model).get("optimizer"))
        while candidates:
            optimizer = candidates.pop()
            if isinstance(optimizer, keras.optimizers.Optimizer):
                found.append(optimizer)
                candidates.append(getattr(optimizer, "inner_optimizer", None))
    return found


def keep_one_node_per_call(root) -> None:
    """Drops, from every layer and operation of ``root``'s graphs, the graph
    nodes of graphs that ``root`` no longer runs (those of a graph rebuilt
    around the same layers, or of the copied original's other graphs), so
    that each has one node per call, as in a freshly built model. Layers
    without a node in ``root``'s graphs are left as they are. The graphs'
    node keys are computed anew (they hold the operations' ids and node
    indices)."""
    graphs = _graphs(root)
    nodes = [node for graph in graphs for node in internals.graph_nodes(graph)]
    live = {id(node) for node in nodes}
    operations = {id(node.operation): node.operation for node in nodes}
    for _, layer in walk(root):
        operations.setdefault(id(layer), layer)
    for operation in operations.values():
        if any(id(node) in live for node in internals.inbound_nodes(operation)):
            internals.keep_graph_nodes(operation, live)
    for graph in graphs:
        internals.refresh_node_keys(graph)


def transplant(layer, fresh, keep_variables: bool) -> None:
    """Makes ``layer`` the layer ``fresh`` is, without replacing the object.

    ``layer`` takes ``fresh``'s class and every attribute that its class sets
    (configuration, build state, call signature), and keeps what makes it the
    object it is: its name, graph nodes, tracking and name scope. Every holder
    of ``layer`` thus holds the new kind of layer.

    Args:
        layer: the layer to change (built or not).
        fresh: a layer of the new class, built as ``layer`` is, used up.
        keep_variables: True for a layer of the same weights (a BN swapped for
            another BN): ``layer`` keeps its variables, and with them their
            values, paths and optimizer slots. False: ``layer``'s variables
            are dropped and ``fresh``'s taken.
    """
    is_variable = internals.VARIABLE_TYPES
    variables = {k for k, v in vars(fresh).items() if isinstance(v, is_variable)}
    if keep_variables:
        own = {k for k, v in vars(layer).items() if isinstance(v, is_variable)}
        if own != variables:
            raise ValueError(
                f"Layer {layer.name!r} holds the variables {sorted(own)}, but a "
                f"{type(fresh).__name__} holds {sorted(variables)}."
            )
    else:
        for key, value in list(vars(layer).items()):
            if isinstance(value, is_variable):
                # Keras's own __delattr__ would also run gc.collect(), 0.3 s
                # a variable in a large process.
                internals.untrack_variable(layer, value)
                object.__delattr__(layer, key)
    identity = internals.IDENTITY_ATTRIBUTES
    for key in [k for k in vars(layer) if k not in identity and k not in variables]:
        object.__delattr__(layer, key)
    layer.__class__ = type(fresh)
    for key, value in vars(fresh).items():
        if key in identity or (key in variables and keep_variables):
            continue
        if key in variables:
            with internals.unlocked_tracker(layer):
                setattr(layer, key, value)  # Keras tracks the variable
        else:
            object.__setattr__(layer, key, value)


def build_like(fresh, layer):
    """Builds ``fresh`` as ``layer`` was built, its variables under ``layer``'s
    name scope (so their paths are those ``layer``'s would be). Returns ``fresh``."""
    if layer.built:
        internals.set_parent_path(fresh, internals.parent_path(layer))
        fresh.build_from_config(layer.get_build_config())
    return fresh


def add_weight_in_place(layer, **kwargs) -> keras.Variable:
    """A new weight of an already built ``layer``, at the path it would have had."""
    with internals.unlocked_tracker(layer), keras.name_scope(layer.name, caller=layer):
        return layer.add_weight(**kwargs)


def forget_compiled_functions(root) -> None:
    """Drops the compiled train/test/predict functions of every model in the
    tree, so that the next call traces the layers as they are now."""
    for model in models(root):
        for name in ("train_function", "test_function", "predict_function"):
            if hasattr(model, name):
                setattr(model, name, None)


def _first_argument(node):
    """A graph node's first call argument: positional, or the keyword ``inputs``."""
    arguments = node.arguments
    return arguments.args[0] if arguments.args else arguments.kwargs.get("inputs")


def _graphs(root) -> list:
    """The functional graphs of the tree: each functional model's own, and the
    one a built Sequential model runs."""
    return [graph for graph in map(internals.graph_of, models(root)) if graph]


class Graphs:
    """The nodes and held tensors of every functional graph in a tree.

    Only nodes of the graphs that the models run count: a layer object also
    keeps the nodes of graphs built and dropped on the way (a Sequential model
    rebuilds its graph as layers are added, and again when copied).
    """

    def __init__(self, root):
        graphs = _graphs(root)
        self._nodes = {
            id(node) for graph in graphs for node in internals.graph_nodes(graph)
        }
        # Tensors used beyond the graph's internal edges: its outputs, and
        # tensors a model keeps as attributes (a keras_hub backbone's
        # ``pyramid_outputs``).
        self._held = {
            id(item)
            for model in [*models(root), *graphs]
            for value in vars(model).values()
            for item in _flat(value)
            if isinstance(item, keras.KerasTensor)
        }

    def nodes_in(self, nodes) -> list:
        return [node for node in nodes if id(node) in self._nodes]

    def calls(self, layer) -> list:
        """The graph nodes that call ``layer``."""
        return self.nodes_in(internals.inbound_nodes(layer))

    def called_with(self, layer, argument: str, value) -> bool:
        """Whether a graph calls ``layer`` with the keyword ``argument=value``."""
        return any(
            node.arguments.kwargs.get(argument, object()) == value
            for node in self.calls(layer)
        )

    def sole_producer(self, layer):
        """The layer whose output ``layer`` alone consumes, in a functional graph.

        That is: ``layer`` is called once, its first argument is the one
        output of a layer called once, and nothing else uses that output (no
        other layer or operation node, no model output, no tensor a model
        keeps). Layers called inside a custom layer's ``call`` have no graph
        nodes, so none is found for them.

        Returns:
            The producing layer, or None.
        """
        calls = self.calls(layer)
        if len(calls) != 1:
            return None
        tensor = _first_argument(calls[0])
        if not isinstance(tensor, keras.KerasTensor) or id(tensor) in self._held:
            return None
        producer = internals.producer(tensor)
        if not isinstance(producer, keras.layers.Layer):
            return None
        produced = self.calls(producer)
        if len(produced) != 1 or len(produced[0].outputs) != 1:
            return None
        if self.nodes_in(internals.outbound_nodes(producer)) != calls:
            return None
        return producer


def _flat(value) -> list:
    try:
        return keras.tree.flatten(value)
    except (TypeError, ValueError):
        return []


def is_plain_graph(model) -> bool:
    """Whether ``model`` is a plain Sequential or functional model: one whose
    class adds nothing to its graph, so it may be rebuilt from its layers."""
    return type(model) is keras.Sequential or (
        type(model).__name__ == "Functional" and hasattr(model, "outputs")
    )


def without(model, removed: set[int]) -> keras.Model:
    """``model`` rebuilt without the layers whose ``id`` is in ``removed``.

    A removed layer's input flows through in its place. Only plain graphs
    (:func:`is_plain_graph`) are rebuilt, nested ones too; every other layer,
    and every other model, is reused as it is. Compile state is kept.
    """

    rebuilt: dict[int, keras.layers.Layer] = {}

    def reuse(layer):  # a nested plain graph is rebuilt once, however often called
        if id(layer) not in rebuilt:
            rebuilt[id(layer)] = (
                without(layer, removed) if is_plain_graph(layer) else layer
            )
        return rebuilt[id(layer)]

    if not is_plain_graph(model):
        return model
    if isinstance(model, keras.Sequential):
        layers = [reuse(layer) for layer in model.layers if id(layer) not in removed]
        new_model = keras.Sequential(
            [_input_of(model), *layers], name=model.name, trainable=model.trainable
        )
    else:
        inputs = keras.tree.map_structure(_new_input(model), model.input)
        outputs = internals.run_through_graph(model, inputs, reuse, _skipping(removed))
        new_model = keras.Model(inputs, outputs, name=model.name)
    compile_like(new_model, model)
    return new_model


def compile_like(new: keras.Model, original: keras.Model, copier=None) -> None:
    """Compiles ``new`` as ``original`` was compiled, if it was.

    Keras's own ``compile`` gets copies of the objects that ``original``'s
    ``compile`` recorded (losses and metrics as functions or objects,
    registered or not: nothing is serialized) and a new optimizer of the same
    class and config (:func:`fresh_optimizer`). A class that overrides
    ``compile`` (keras_hub tasks do) gets the same: what its override set on
    the model was copied with the model, and the recorded arguments are those
    its override passed on to Keras's.

    Args:
        new: the model to compile.
        original: the model whose compile arguments to copy.
        copier: the :class:`kerasbn._copier.Copier` that copied ``new`` from
            ``original`` (so that an argument shared with the model, such as
            a metric a layer also holds, stays shared); a new one if None.
    """
    if not getattr(original, "compiled", False):
        return
    arguments = internals.compile_arguments(original)
    arguments.pop("optimizer", None)
    copier = copier or Copier(internals.copy_rule, describe=_describe)
    arguments = copier.copy(arguments, "the compile arguments")
    for metric in keras.tree.flatten(arguments):  # compiled anew: fresh state
        if isinstance(metric, keras.metrics.Metric):
            metric.reset_state()
    optimizer = getattr(original, "optimizer", None)
    optimizer = None if optimizer is None else fresh_optimizer(optimizer)
    keras.Model.compile(new, optimizer=optimizer, **arguments)
    if new.built and new.optimizer is not None:
        new.optimizer.build(new.trainable_variables)


def fresh_optimizer(optimizer: keras.optimizers.Optimizer):
    """A new, unbuilt optimizer of ``optimizer``'s class and config: a copy of
    its learning-rate schedule (registered or not), and a fresh inner
    optimizer for a ``LossScaleOptimizer``."""
    config = optimizer.get_config()
    inner = getattr(optimizer, "inner_optimizer", None)
    if inner is not None and "inner_optimizer" in config:
        del config["inner_optimizer"]
        return type(optimizer)(fresh_optimizer(inner), **config)
    schedule = internals.learning_rate_schedule(optimizer)
    if schedule is not None:
        config["learning_rate"] = Copier(internals.copy_rule).copy(schedule)
    return type(optimizer).from_config(config)


def _skipping(removed: set[int]) -> Callable:
    def call(layer, *args, **kwargs):
        if id(layer) in removed:  # a removed layer: its input flows through
            return args[0] if args else kwargs["inputs"]
        return layer(*args, **kwargs)

    return call


def _new_input(functional) -> Callable:
    """A function from one of ``functional``'s inputs to a new ``keras.Input``
    with the config (name included) of the input layer that made it.

    (``clone_model`` alone names new inputs after the tensors, not the input
    layers, so the configs would change.)
    """
    layers = {
        id(operation.output): operation
        for operation in functional.operations
        if isinstance(operation, keras.layers.InputLayer)
    }

    def new_input(tensor):
        layer = layers[id(tensor)]
        return type(layer).from_config(layer.get_config()).output

    return new_input


def _input_of(sequential):
    """A new input layer like the one of ``sequential``, name included."""
    first = sequential.get_config()["layers"][0]
    if first["class_name"] == "InputLayer":
        return keras.layers.InputLayer.from_config(first["config"])
    source = sequential.inputs[0]
    return keras.Input(batch_shape=source.shape, dtype=source.dtype)
