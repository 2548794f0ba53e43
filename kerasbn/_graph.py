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

import copy
import sys
import threading
import types
from collections.abc import Callable, Iterator

import keras

# Keras internals that a true copy must know: the graph map of functional
# models, the base class of what Keras pickles, and the tracked containers.
from keras.src.ops import function as keras_function
from keras.src.saving import keras_saveable, serialization_lib
from keras.src.trainers import trainer
from keras.src.utils import backend_utils, tracking

from kerasbn.layer import BatchNorm

BATCH_NORMS = (BatchNorm, keras.layers.BatchNormalization)

# What makes a Keras layer the object it is, rather than what its class adds:
# tracking, graph nodes, identity and name scope, the build wrappers. A
# transplant keeps these and takes everything else from the new class's layer.
_IDENTITY = frozenset(
    {
        "_tracker",
        "_layers",
        "_trainable_variables",
        "_non_trainable_variables",
        "_seed_generators",
        "_metrics",
        "_losses",
        "_loss_ids",
        "_losses_override",
        "_inbound_nodes",
        "_outbound_nodes",
        "name",
        "_path",
        "_parent_path",
        "_build_shapes_dict",
        "built",
        "_called",
        "_lock",
        "build",
        "quantize",
    }
)


def check_model(model, function: str) -> None:
    """Raises a clear error unless ``model`` is a ``keras.Model``."""
    if not isinstance(model, keras.Model):
        raise ValueError(
            f"`{function}` needs a keras.Model (functional, Sequential or "
            f"subclassed); got {type(model).__name__} {getattr(model, 'name', model)!r}."
        )


def walk(root) -> list[tuple[str, keras.layers.Layer]]:
    """Every layer of ``root``'s tree, ``root`` first, each once, with its path.

    The path joins the layers' names from ``root`` down, as Keras's weight
    paths do (``"model/block_1/bn"``). A layer held in several places (a
    shared layer) is listed once, at its first path.
    """
    found: list[tuple[str, keras.layers.Layer]] = []
    seen: set[int] = set()

    def visit(path: str, layer) -> None:
        if id(layer) in seen:
            return
        seen.add(id(layer))
        found.append((path, layer))
        for child in layer._layers:  # Keras's own record of every sub-layer
            visit(f"{path}/{child.name}", child)

    visit(root.name, root)
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
    """A true copy of ``model``: every object of its tree deep-copied.

    Keras pickles (and so deep-copies) a model by saving and loading it,
    which gives unnamed layers new names and so new weight paths, and needs
    every class registered. Here every layer and model is copied as a plain
    Python object instead, attribute by attribute: the copy has the model's
    class, config and attributes, every layer (those off the output path
    too), the same layer names and weight paths, the state of lazily built
    layers, and new variables with the same values. A compiled model's copy
    is compiled from its compile config, with a new optimizer (an optimizer
    keys its slots by the variables' ids); compiled train/test/predict
    functions are not copied, and the next call compiles them anew.

    Raises:
        ValueError: if ``model`` cannot be copied; the message names
            ``function`` and the way to change the model in place instead.
    """
    copiers = {
        keras_saveable.KerasSaveable: _new_like,  # optimizers, losses, metrics
        keras.layers.Layer: _copy_layer,
        tracking.Tracker: _copy_tracker,
        **{
            cls: _copy_container
            for cls in (
                tracking.TrackedList,
                tracking.TrackedDict,
                tracking.TrackedOrderedDict,
                tracking.TrackedSet,
            )
        },
    }
    for cls, copier in copiers.items():
        cls.__deepcopy__ = copier
    # Shared, not copied: modules, and Keras's backend selector (stateless,
    # and its __getattr__ recurses on an object made without __init__).
    for kind in _SHARED:
        copy._deepcopy_dispatch[kind] = _shared
    # Compiled functions are not copied. They are set aside on the original
    # for the copy (as Keras does to save a TensorFlow SavedModel): on
    # TensorFlow the model's checkpoint dependencies also name them.
    compiled = [
        (m, name, getattr(m, name))
        for m in models(model)
        for name in _COMPILED
        if getattr(m, name, None) is not None
    ]
    records = [_set_aside_dependencies(m) for m in models(model)]
    try:
        for m, name, _ in compiled:
            setattr(m, name, None)
        duplicate = _deep_stack_call(copy.deepcopy, model)
    except Exception as error:
        raise ValueError(
            f"`{function}` works on a copy of the model, and copying "
            f"{type(model).__name__} {model.name!r} failed: {error}. Pass "
            "in_place=True to change the model itself."
        ) from error
    finally:
        for cls in copiers:
            del cls.__deepcopy__
        for kind in _SHARED:
            del copy._deepcopy_dispatch[kind]
        for m, name, function in compiled:
            setattr(m, name, function)
        for restore in records:
            restore()
    for graph in _graphs(duplicate):  # their node keys hold the objects' ids
        nodes = keras_function.map_graph(graph._inputs, graph._outputs)[0]
        object.__setattr__(graph, "_nodes", nodes)
    for original, new in zip(models(model), models(duplicate)):
        compile_like(new, original)  # an optimizer keys its slots by id
    return duplicate


# Attributes of a layer that are not copied: the wrappers that Keras makes
# for each new layer object (the copy has its own). Compiled functions are
# set aside while a model is copied.
_NOT_COPIED = ("build", "quantize")
_COMPILED = ("train_function", "test_function", "predict_function")


def _new_like(original, memo: dict, skip: tuple = ()):
    """A new object of ``original``'s class with deep copies of its attributes."""
    cls = type(original)
    duplicate = cls.__new__(cls)  # for a layer, Keras's __new__ makes its wrappers
    memo[id(original)] = duplicate
    for key, value in vars(original).items():
        if key in skip:
            continue
        if "strategy" not in key:  # a distribution strategy is shared
            value = copy.deepcopy(value, memo)
        object.__setattr__(duplicate, key, value)
    return duplicate


_SHARED = (types.ModuleType, backend_utils.DynamicBackend)


def _set_aside_dependencies(model) -> Callable[[], None]:
    """Takes the compiled functions out of a TensorFlow model's checkpoint
    dependency records (a tf.function cannot be copied); returns the call
    that puts them back."""
    names = getattr(model, "_self_unconditional_dependency_names", None)
    references = getattr(model, "_self_unconditional_checkpoint_dependencies", None)
    if names is None or references is None:
        return lambda: None
    taken = {name: dict.pop(names, name) for name in _COMPILED if name in names}
    kept = [ref for ref in references if ref.name not in _COMPILED]
    everything = list(references)
    list.clear(references)
    list.extend(references, kept)

    def restore():
        dict.update(names, taken)
        list.clear(references)
        list.extend(references, everything)

    return restore


def _deep_stack_call(function, *args):
    """``function(*args)`` in a thread with a large stack and recursion limit.

    A deep copy follows a graph edge by edge (node, tensor, layer, node...),
    so a deep model (BASNet's hundreds of layers) recurses far deeper than
    Python's default limit and the main thread's C stack allow.
    """
    result, failure = [], []

    def run():
        try:
            result.append(function(*args))
        except BaseException as error:  # re-raised in the calling thread
            failure.append(error)

    depth, size = sys.getrecursionlimit(), threading.stack_size()
    sys.setrecursionlimit(max(depth, 200_000))
    threading.stack_size(1 << 30)
    try:
        worker = threading.Thread(target=run)
        worker.start()
        worker.join()
    finally:
        threading.stack_size(size)
        sys.setrecursionlimit(depth)
    if failure:
        raise failure[0]
    return result[0]


def _shared(value, memo: dict):
    return value


def _copy_layer(layer, memo: dict):
    return _new_like(layer, memo, skip=_NOT_COPIED)


def _copy_tracker(tracker, memo: dict):
    """A tracker's copy, whose record of ids is that of the copied stores."""
    duplicate = _new_like(tracker, memo)
    duplicate.stored_ids = {
        name: {id(value) for value in store}
        for name, (_, store) in duplicate.config.items()
    }
    return duplicate


def _copy_container(container, memo: dict):
    """A tracked list, dict or set copied without tracking its items again
    (its tracker's stores are copied with the layer)."""
    duplicate = _new_like(container, memo)
    base = next(c for c in type(container).__mro__ if c in (list, dict, set))
    if base is dict:
        items = {k: copy.deepcopy(v, memo) for k, v in container.items()}
        dict.update(duplicate, items)
    else:
        getattr(base, "update" if base is set else "extend")(
            duplicate, [copy.deepcopy(v, memo) for v in container]
        )
    return duplicate


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
    variables = {k for k, v in vars(fresh).items() if isinstance(v, keras.Variable)}
    if keep_variables:
        own = {k for k, v in vars(layer).items() if isinstance(v, keras.Variable)}
        if own != variables:
            raise ValueError(
                f"Layer {layer.name!r} holds the variables {sorted(own)}, but a "
                f"{type(fresh).__name__} holds {sorted(variables)}."
            )
    else:
        for key, value in list(vars(layer).items()):
            if isinstance(value, keras.Variable):
                # Keras's own __delattr__ would also run gc.collect(), 0.3 s
                # a variable in a large process.
                layer._untrack_variable(value)
                object.__delattr__(layer, key)
    for key in [k for k in vars(layer) if k not in _IDENTITY and k not in variables]:
        object.__delattr__(layer, key)
    layer.__class__ = type(fresh)
    for key, value in vars(fresh).items():
        if key in _IDENTITY or (key in variables and keep_variables):
            continue
        if key in variables:
            layer._tracker.unlock()
            setattr(layer, key, value)  # Keras tracks the variable
            layer._tracker.lock()
        else:
            object.__setattr__(layer, key, value)


def build_like(fresh, layer):
    """Builds ``fresh`` as ``layer`` was built, its variables under ``layer``'s
    name scope (so their paths are those ``layer``'s would be). Returns ``fresh``."""
    if layer.built:
        fresh._parent_path = layer._parent_path
        fresh.build_from_config(layer.get_build_config())
    return fresh


def add_weight_in_place(layer, **kwargs) -> keras.Variable:
    """A new weight of an already built ``layer``, at the path it would have had."""
    layer._tracker.unlock()
    try:
        with keras.name_scope(layer.name, caller=layer):
            return layer.add_weight(**kwargs)
    finally:
        layer._tracker.lock()


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
    graphs = []
    for model in models(root):
        graph = getattr(model, "_functional", None) or model
        if hasattr(graph, "_nodes_by_depth"):
            graphs.append(graph)
    return graphs


class Graphs:
    """The nodes and held tensors of every functional graph in a tree.

    Only nodes of the graphs that the models run count: a layer object also
    keeps the nodes of graphs built and dropped on the way (a Sequential model
    rebuilds its graph as layers are added, and again when copied).
    """

    def __init__(self, root):
        graphs = _graphs(root)
        self._nodes = {
            id(node)
            for graph in graphs
            for nodes in graph._nodes_by_depth.values()
            for node in nodes
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
        return self.nodes_in(layer._inbound_nodes)

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
        producer = tensor._keras_history.operation
        if not isinstance(producer, keras.layers.Layer):
            return None
        produced = self.calls(producer)
        if len(produced) != 1 or len(produced[0].outputs) != 1:
            return None
        if self.nodes_in(producer._outbound_nodes) != calls:
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

    def reuse(layer):
        return without(layer, removed) if is_plain_graph(layer) else layer

    if not is_plain_graph(model):
        return model
    if isinstance(model, keras.Sequential):
        layers = [reuse(layer) for layer in model.layers if id(layer) not in removed]
        new_model = keras.Sequential(
            [_input_of(model), *layers], name=model.name, trainable=model.trainable
        )
    else:
        new_model = keras.models.clone_model(
            model,
            input_tensors=keras.tree.map_structure(_new_input(model), model.input),
            clone_function=reuse,
            call_function=_skipping(removed),
        )
    compile_like(new_model, model)
    return new_model


def compile_like(new: keras.Model, original: keras.Model) -> None:
    """Compiles ``new`` as ``original`` was compiled (a fresh optimizer), if it was.

    Keras's own ``compile`` is called with the arguments it recorded, as
    ``compile_from_config`` does. A class that overrides ``compile`` (keras_hub
    tasks do), which ``compile_from_config`` declines with a warning about
    model loading, gets the same: what its override set on the model was
    copied with the model, and the recorded arguments are those its override
    passed on to Keras's.
    """
    if not getattr(original, "compiled", False):
        return
    config = serialization_lib.deserialize_keras_object(original.get_compile_config())
    trainer.Trainer.compile(new, **config)
    if new.built:
        new.optimizer.build(new.trainable_variables)


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
