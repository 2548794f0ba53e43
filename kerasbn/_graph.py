"""Walking and rebuilding Keras models, shared by :mod:`kerasbn.fold` and
:mod:`kerasbn.convert`.

Only public Keras API is used: ``keras.models.clone_model`` (with
``clone_function`` and ``call_function``), ``keras.Sequential``, the layers'
``get_config``/``get_build_config``/``get_weights``, and the functional
model's ``get_config()``, which lists every call with the ``keras_history``
``(operation name, node index, tensor index)`` of its inputs.

A functional graph holds operations, of which layers are one kind: a
``keras.ops`` call on a symbolic tensor (``x + 3.0``, ``keras.ops.multiply``)
is an operation node without weights, state or build. Such nodes are never
given to a tool's per-layer callback; they are re-created from their config,
as ``keras.models.clone_model`` does by default.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator

import keras


def is_graph_model(layer) -> bool:
    """Whether ``layer`` is a Sequential or functional model (a layer graph).

    Subclassed models have no ``outputs``: their layers cannot be rebuilt one
    by one, so they are treated as opaque layers.
    """
    if isinstance(layer, keras.Sequential):
        return True
    return isinstance(layer, keras.Model) and hasattr(layer, "outputs")


def check_model(model, function: str) -> None:
    """Raises a clear error unless ``model`` is a built Sequential/functional model."""
    if not isinstance(model, keras.Model) or not is_graph_model(model):
        raise ValueError(
            f"`{function}` needs a built Sequential or functional keras.Model; got "
            f"{type(model).__name__} {getattr(model, 'name', model)!r}. Subclassed "
            "models cannot be rebuilt layer by layer."
        )


def graph_models(model) -> Iterator[keras.Model]:
    """``model`` and every Sequential/functional model nested in it, outer first."""
    yield model
    for layer in model.layers:
        if is_graph_model(layer):
            yield from graph_models(layer)


def layer_uses(model) -> Counter:
    """How many (sub)models list each layer, by ``id``: above 1 means shared."""
    return Counter(id(layer) for m in graph_models(model) for layer in m.layers)


def copy_state(source, target):
    """Builds ``target`` as ``source`` was built and gives it ``source``'s weights.

    Returns:
        ``target``.
    """
    target.build_from_config(source.get_build_config())
    target.set_weights(source.get_weights())
    return target


def copy_layer(layer):
    """A new layer with ``layer``'s class, config and weights."""
    return copy_state(layer, type(layer).from_config(layer.get_config()))


def is_layer(operation) -> bool:
    """Whether a graph node's operation is a layer (an operation that may hold
    weights and must be built), rather than a bare ``keras.ops`` operation."""
    return isinstance(operation, keras.layers.Layer)


def copy_operation(operation):
    """A bare operation (not a layer) re-created from its config, as
    ``keras.models.clone_model`` does; the operation itself where its class
    cannot be serialized. An operation holds no state, so either computes the
    same thing."""
    try:
        config = operation.get_config()
    except NotImplementedError:  # Keras's own refusal for unserializable args
        return operation
    return type(operation).from_config(config)


def rewrite(model, replace: Callable) -> keras.Model:
    """A copy of ``model`` where each layer becomes ``replace(layer)``.

    Nested Sequential and functional models are rebuilt in the same way. A
    layer (or nested model) that appears several times maps to one copy.
    Operation nodes that are not layers are re-created (:func:`copy_operation`).

    Args:
        model: a Sequential or functional model.
        replace: called once per layer that is not a graph model, with the
            original layer. It returns the new layer, ``None`` to remove the
            layer (its input flows through unchanged), or ``layer`` itself to
            request a plain copy with the same config and weights.

    Returns:
        The new model, compiled from the original's compile config if the
        original was compiled.
    """
    copies = {}

    def copy(layer):
        if id(layer) not in copies:
            if is_graph_model(layer):
                new = rebuild(layer)
            elif not is_layer(layer):
                new = copy_operation(layer)
            else:
                new = replace(layer)
                new = copy_layer(layer) if new is layer else new
            copies[id(layer)] = new
        return copies[id(layer)]

    def call(new, *args, **kwargs):
        if new is None:  # a removed layer: its input flows through
            return args[0] if args else kwargs["inputs"]
        return new(*args, **kwargs)

    def rebuild(m):
        if not isinstance(m, keras.Sequential):
            new_model = keras.models.clone_model(
                m,
                input_tensors=keras.tree.map_structure(_new_input(m), m.input),
                clone_function=copy,
                call_function=call,
            )
            if not m.trainable:  # as Keras's from_config sets it: for every layer
                new_model.trainable = False
            return new_model
        if not m.built:
            raise ValueError(f"The Sequential model {m.name!r} must be built.")
        layers = [new for new in map(copy, m.layers) if new is not None]
        new_model = keras.Sequential(
            [_input_of(m), *layers], name=m.name, trainable=m.trainable
        )
        if m.compiled:
            new_model.compile_from_config(m.get_compile_config())
        return new_model

    return rebuild(model)


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


def _keras_histories(structure) -> list[tuple]:
    """The ``(layer, node, tensor)`` of every tensor in a serialized structure.

    Handles a call's serialized arguments (``__keras_tensor__`` entries) and a
    functional config's ``output_layers`` (``[layer, node, tensor]`` lists).
    """
    if isinstance(structure, dict):
        if structure.get("class_name") == "__keras_tensor__":
            return [tuple(structure["config"]["keras_history"])]
        return [h for value in structure.values() for h in _keras_histories(value)]
    if isinstance(structure, (list, tuple)):
        if len(structure) == 3 and isinstance(structure[0], str):
            return [tuple(structure)]
        return [h for item in structure for h in _keras_histories(item)]
    return []


def sole_consumer_pairs(model) -> list[tuple]:
    """Pairs ``(producer, consumer)`` of layers directly connected in ``model``.

    Each layer of a pair is called once in ``model``, the consumer's first
    argument (positional, or the keyword ``inputs``) is the producer's output,
    and nothing else (no other layer or operation, no model output) uses that
    output. In a Sequential model these are the consecutive layers. Operation
    nodes that are not layers count as users but are never part of a pair.

    Returns:
        A list of pairs of the original layer objects.
    """
    if isinstance(model, keras.Sequential):
        return list(zip(model.layers, model.layers[1:]))
    config = model.get_config()
    calls = {entry["name"]: entry["inbound_nodes"] for entry in config["layers"]}
    uses = Counter(_keras_histories(config["output_layers"]))
    for nodes in calls.values():
        uses.update(_keras_histories(nodes))
    operations = {operation.name: operation for operation in model.operations}
    pairs = []
    for name, nodes in calls.items():
        if len(nodes) != 1:
            continue
        first = _keras_histories(_first_argument(nodes[0]))
        if len(first) != 1 or uses[first[0]] != 1:
            continue
        producer, consumer = operations[first[0][0]], operations[name]
        if len(calls[producer.name]) == 1 and is_layer(producer) and is_layer(consumer):
            pairs.append((producer, consumer))
    return pairs


def _first_argument(node: dict):
    """A serialized call's first argument: positional, or the keyword ``inputs``."""
    return node["args"][0] if node["args"] else node.get("kwargs", {}).get("inputs")


def layers_called_with(model, argument: str, value) -> list[str]:
    """Names of the layers that a functional ``model`` (or a nested one) calls
    with the keyword ``argument`` set to ``value``, e.g. ``training=True``."""
    names = []
    for m in graph_models(model):
        if isinstance(m, keras.Sequential):
            continue
        for entry in m.get_config()["layers"]:
            if any(
                node.get("kwargs", {}).get(argument, object()) == value
                for node in entry["inbound_nodes"]
            ):
                names.append(entry["name"])
    return names
