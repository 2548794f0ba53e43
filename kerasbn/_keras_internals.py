"""Every Keras internal that kerasbn relies on, in one room.

kerasbn's model tools change layers in place, copy models object by object
and read functional graphs. Keras has public APIs for most of that, and for
the rest this module is the only place in kerasbn that imports ``keras.src``
or reads or writes a private attribute of a Keras object (ruff enforces it:
banned ``keras.src`` imports and ``SLF001`` everywhere else).

Each entry below says, in one line, which public API is missing and the Keras
releases it was checked on. Nothing here reads Keras's version string: each
internal is detected on the objects themselves (:func:`require`), and a tool
whose internal is missing raises :class:`KerasInternalsError` at its entry,
before it changes anything.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterable, Iterator

import keras

__all__ = [
    "IDENTITY_ATTRIBUTES",
    "KerasInternalsError",
    "VARIABLE_TYPES",
    "compile_arguments",
    "copy_rule",
    "graph_nodes",
    "graph_of",
    "inbound_nodes",
    "keep_graph_nodes",
    "learning_rate_schedule",
    "outbound_nodes",
    "parent_path",
    "producer",
    "refresh_node_keys",
    "rekey_torch_parameters",
    "require",
    "run_through_graph",
    "set_parent_path",
    "sublayers",
    "unlocked_tracker",
    "untrack_variable",
]

CHECKED = "Keras 3.3 to 3.15"


def _optional(module: str, name: str):
    """``module.name`` from ``keras.src``, or None where this Keras lacks it."""
    try:
        return getattr(importlib.import_module(f"keras.src.{module}"), name)
    except (ImportError, AttributeError):
        return None


# KerasSaveable: the base of layers, models, optimizers, losses and metrics,
# whose pickling saves a whole .keras file; no public name. 3.3-3.15.
_KERAS_SAVEABLE = _optional("saving.keras_saveable", "KerasSaveable")
# Tracker and the tracked containers that hold a layer's sub-layers and
# variables; no public name. TrackedOrderedDict exists from 3.14. 3.3-3.15.
_TRACKER = _optional("utils.tracking", "Tracker")
_TRACKED_CONTAINERS = tuple(
    cls
    for cls in (
        _optional("utils.tracking", name)
        for name in ("TrackedList", "TrackedDict", "TrackedOrderedDict", "TrackedSet")
    )
    if cls is not None
)
# KerasVariable: the base of every backend's variable class. keras.Variable
# is that base from 3.4; in 3.3 it is a separate export that no layer's
# variable is an instance of. 3.3-3.15.
_KERAS_VARIABLE = _optional("backend.common.variables", "KerasVariable")
VARIABLE_TYPES = tuple({keras.Variable, _KERAS_VARIABLE} - {None})
# DynamicBackend: a stateless backend selector held by preprocessing layers,
# shared by a copy; no public name. 3.3-3.15.
_DYNAMIC_BACKEND = _optional("utils.backend_utils", "DynamicBackend")
# map_graph: the node keys of a functional graph; no public API. 3.3-3.15.
_MAP_GRAPH = _optional("ops.function", "map_graph")


class KerasInternalsError(RuntimeError):
    """The installed Keras lacks an internal that a kerasbn tool relies on."""


# ----------------------------------------------------------------- probes
# name -> (what it is and why no public API serves, probe on an object)
_PROBES: dict[str, tuple[str, Callable[[object], bool]]] = {
    "Layer._layers": (
        "every sub-layer a layer tracks, at any holding (Model.layers lists "
        "a model's direct layers only)",
        lambda layer: isinstance(getattr(layer, "_layers", None), list),
    ),
    "Layer._tracker": (
        "the lock of a built layer's variable tracking (add_weight after build)",
        lambda layer: hasattr(getattr(layer, "_tracker", None), "unlock"),
    ),
    "Layer._untrack_variable": (
        "removing a variable from a layer without Keras's gc.collect() per call",
        lambda layer: callable(getattr(layer, "_untrack_variable", None)),
    ),
    "Layer._parent_path": (
        "the name scope of a layer's variables (their weight paths)",
        lambda layer: hasattr(layer, "_parent_path"),
    ),
    "Operation._inbound_nodes": (
        "the graph nodes that call a layer or operation",
        lambda op: (
            isinstance(getattr(op, "_inbound_nodes", None), list)
            and isinstance(getattr(op, "_outbound_nodes", None), list)
        ),
    ),
    "Function._nodes_by_depth": (
        "the nodes of a functional graph, and its input and output tensors",
        lambda graph: all(
            hasattr(graph, name)
            for name in ("_nodes_by_depth", "_nodes", "_inputs", "_outputs")
        ),
    ),
    "Sequential._functional": (
        "the functional graph that a built Sequential model runs",
        lambda model: (
            not isinstance(model, keras.Sequential) or hasattr(model, "_functional")
        ),
    ),
    "KerasTensor._keras_history": (
        "the operation that produced a symbolic tensor",
        lambda graph: all(
            hasattr(tensor, "_keras_history")
            for tensor in keras.tree.flatten(getattr(graph, "_outputs", []))
        ),
    ),
    "ops.function.map_graph": (
        "the node keys of a functional graph (they hold the operations' ids)",
        lambda _: _MAP_GRAPH is not None,
    ),
    "saving.KerasSaveable": (
        "the base class of what Keras pickles by saving a whole file",
        lambda _: _KERAS_SAVEABLE is not None,
    ),
    "utils.tracking.Tracker": (
        "the tracker and tracked containers of a layer's attributes",
        lambda _: _TRACKER is not None and bool(_TRACKED_CONTAINERS),
    ),
    "Trainer._compile_config": (
        "the arguments a model was compiled with, as objects",
        lambda model: (
            not getattr(model, "compiled", False)
            or hasattr(getattr(model, "_compile_config", None), "config")
        ),
    ),
}

# What each group of a tool's work needs, and on which objects it is probed.
_NEEDS = {
    "tree": ("Layer._layers",),
    "transplant": ("Layer._tracker", "Layer._untrack_variable", "Layer._parent_path"),
    "graph": (
        "Operation._inbound_nodes",
        "Function._nodes_by_depth",
        "Sequential._functional",
        "KerasTensor._keras_history",
        "ops.function.map_graph",
    ),
    "copy": (
        "saving.KerasSaveable",
        "utils.tracking.Tracker",
        "Trainer._compile_config",
    ),
}


def require(function: str, model, *needs: str) -> None:
    """Raises unless this Keras has every internal that ``needs`` name.

    Each internal is probed on ``model``'s own objects (its layers, models and
    graphs), so nothing is created or changed.

    Args:
        function: the tool's name, for the message.
        model: the model the tool was given.
        *needs: groups of internals: ``"tree"`` (always), ``"transplant"``,
            ``"graph"``, ``"copy"``.

    Raises:
        KerasInternalsError: naming the internal, what it is for and the
            installed Keras version.
    """
    layers = [model]
    stack = [model]
    while stack:  # the layer tree, through _layers where Keras has it
        for child in getattr(stack.pop(), "_layers", None) or []:
            if all(child is not seen for seen in layers):
                layers.append(child)
                stack.append(child)
    names = [name for need in ("tree", *needs) for name in _NEEDS[need]]
    for name in dict.fromkeys(names):
        description, probe = _PROBES[name]
        targets = layers
        if name in ("Function._nodes_by_depth", "KerasTensor._keras_history"):
            targets = [g for g in map(graph_of, layers) if g is not None] or [None]
            if targets == [None]:
                targets = []  # no functional graph here: nothing to read
        if not all(probe(target) for target in targets):
            raise KerasInternalsError(
                f"`{function}` relies on Keras's internal `{name}` ({description}; "
                f"Keras has no public API for it), which Keras {keras.__version__} "
                f"does not have. kerasbn's tools were checked on {CHECKED}. "
                "Nothing was changed."
            )


# ------------------------------------------------------------ the layer tree
def sublayers(layer) -> list:
    """Every layer that ``layer`` tracks directly, whatever holds it.
    Layer._layers: no public API lists a custom layer's sub-layers. 3.3-3.15."""
    return list(getattr(layer, "_layers", None) or [])


def untrack_variable(layer, variable) -> None:
    """Layer._untrack_variable: no public API drops a variable. 3.3-3.15."""
    layer._untrack_variable(variable)


@contextlib.contextmanager
def unlocked_tracker(layer) -> Iterator[None]:
    """Layer._tracker.unlock/lock: a built layer refuses new weights. 3.3-3.15."""
    layer._tracker.unlock()
    try:
        yield
    finally:
        layer._tracker.lock()


def parent_path(layer):
    """Layer._parent_path: a layer's name scope, no public API. 3.3-3.15."""
    return layer._parent_path


def set_parent_path(layer, path) -> None:
    """Layer._parent_path, set before build. 3.3-3.15."""
    layer._parent_path = path


# What makes a Keras layer the object it is, rather than what its class adds:
# tracking, graph nodes, identity and name scope, the per-object wrappers of
# build and quantize, losses. Layer.__init__/__new__ attributes, 3.3-3.15.
IDENTITY_ATTRIBUTES = frozenset(
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


# -------------------------------------------------------- functional graphs
def graph_of(model):
    """The functional graph that ``model`` runs, or None.
    Sequential._functional and Function._nodes_by_depth: no public API
    exposes a graph's nodes. 3.3-3.15."""
    graph = getattr(model, "_functional", None) or model
    return graph if hasattr(graph, "_nodes_by_depth") else None


def graph_nodes(graph) -> list:
    """Every node of a functional graph. Function._nodes_by_depth. 3.3-3.15."""
    return [node for nodes in graph._nodes_by_depth.values() for node in nodes]


def inbound_nodes(operation) -> list:
    """Operation._inbound_nodes: the nodes that call it. 3.3-3.15."""
    return list(operation._inbound_nodes)


def outbound_nodes(operation) -> list:
    """Operation._outbound_nodes: the nodes that consume its outputs. 3.3-3.15."""
    return list(operation._outbound_nodes)


def producer(tensor):
    """KerasTensor._keras_history.operation: the operation that made a
    symbolic tensor (``tensor.node`` is not public either). 3.3-3.15."""
    return tensor._keras_history.operation


def keep_graph_nodes(operation, live: set[int]) -> None:
    """Drops ``operation``'s inbound and outbound nodes whose id is not in
    ``live`` (nodes of graphs that are gone), and renumbers the node index in
    the history of the kept nodes' output tensors, as Node.__init__ numbers
    it. Operation._inbound_nodes/_outbound_nodes, KerasTensor._keras_history
    (a namedtuple). No public API drops a node. 3.3-3.15."""
    operation._outbound_nodes[:] = [
        node for node in operation._outbound_nodes if id(node) in live
    ]
    kept = [node for node in operation._inbound_nodes if id(node) in live]
    operation._inbound_nodes[:] = kept
    for index, node in enumerate(kept):
        for tensor in node.outputs:
            history = tensor._keras_history
            if history.operation is operation and history.node_index != index:
                tensor._keras_history = history._replace(node_index=index)


def run_through_graph(graph, inputs, operation_fn, call_fn):
    """A functional graph's outputs on new ``inputs``, each node calling
    ``call_fn(operation_fn(operation), *args, **kwargs)``: what
    ``keras.models.clone_model`` does, without compiling the result from a
    serialized compile config as it does from Keras 3.4.
    Function._run_through_graph. 3.3-3.15."""
    return graph._run_through_graph(inputs, operation_fn=operation_fn, call_fn=call_fn)


def refresh_node_keys(graph) -> None:
    """Recomputes a functional graph's node keys, which hold the operations'
    ids (a copy's differ). Function._nodes from map_graph(_inputs, _outputs),
    as Function.__init__ sets it. 3.3-3.15."""
    nodes = _MAP_GRAPH(graph._inputs, graph._outputs)[0]
    object.__setattr__(graph, "_nodes", nodes)


def rekey_torch_parameters(layer) -> None:
    """Re-keys a copied layer's torch parameter dict where Keras keys it by
    the variables' ids (older Keras on PyTorch; later ones key it by path):
    the copy's variables have new ids. TorchLayer.torch_params and
    _track_variables, Keras 3.3-3.15 (keyed by id before about 3.6)."""
    params = (vars(layer).get("_modules") or {}).get("torch_params")  # a submodule
    if params is not None and any(key.isdigit() for key in params.keys()):
        layer._track_variables()


# -------------------------------------------------------------------- compile
def compile_arguments(model) -> dict:
    """The arguments ``model.compile`` recorded, as the objects it was given
    (``get_compile_config`` serializes them, which unregistered losses and
    metrics cannot survive). Trainer._compile_config.config. 3.3-3.15."""
    return dict(model._compile_config.config)


def learning_rate_schedule(optimizer):
    """The optimizer's learning-rate schedule object, or None for a fixed
    rate (``optimizer.learning_rate`` evaluates the schedule).
    BaseOptimizer._learning_rate. 3.3-3.15."""
    rate = getattr(optimizer, "_learning_rate", None)
    schedule = keras.optimizers.schedules.LearningRateSchedule
    return rate if isinstance(rate, schedule) else None


# ----------------------------------------------------------------- copies
# Attributes that Layer.__new__ sets on each new object (wrappers bound to
# it): a copy keeps its own. build from 3.0, quantize from 3.4. 3.3-3.15.
_PER_OBJECT = ("build", "quantize")
# Per-call state that a copy starts without: the losses of the last call
# (symbolic tensors after a traced fit, non-leaf torch tensors). Layer
# attributes, 3.3-3.15.
_TRANSIENT = {"_losses": list, "_loss_ids": set, "_losses_override": list}
# The JAX trainer's record of its variables' device shardings, set by
# fit/evaluate/predict (jax Device objects, which cannot be copied):
# the copy's next fit records its own. JAXTrainer attributes, 3.3-3.15.
_SHARDINGS = (
    "_trainable_variable_shardings",
    "_non_trainable_variable_shardings",
    "_optimizer_variable_shardings",
    "_metrics_variable_shardings",
)
# Compiled functions: a copy compiles its own. Public attributes, but on
# TensorFlow the model's checkpoint dependency records (AutoTrackable's
# _self_unconditional_* internals) also name them. 3.3-3.15.
_COMPILED = ("train_function", "test_function", "predict_function")
_TF_DEPENDENCY_NAMES = "_self_unconditional_dependency_names"
_TF_DEPENDENCIES = "_self_unconditional_checkpoint_dependencies"


def copy_rule(obj) -> Callable | None:
    """How :class:`kerasbn._copier.Copier` copies a Keras object, or None for
    Python's default (the reduce protocol, or the object's ``__deepcopy__``).

    * layers, models, optimizers, losses and metrics (``KerasSaveable``,
      which would pickle by saving a file) are copied attribute by attribute,
      without per-call state (:data:`_TRANSIENT`) and compiled functions, and
      sharing a distribution strategy;
    * a ``Tracker`` is copied, then told the ids of its copied stores;
    * a tracked list, dict or set is filled without tracking its items again;
    * Keras's backend selector is shared.
    """
    if _DYNAMIC_BACKEND is not None and isinstance(obj, _DYNAMIC_BACKEND):
        return _shared
    if type(obj).__module__ == _TF_DATA_STRUCTURES:
        return _copy_tf_wrapper
    if isinstance(obj, _KERAS_SAVEABLE or ()):
        return _copy_keras_object
    if isinstance(obj, _TRACKER or ()):
        return _copy_tracker
    if isinstance(obj, _TRACKED_CONTAINERS):
        return _copy_tracked_container
    return None


# TensorFlow wraps lists, dicts and tuples assigned to a trackable object
# (ListWrapper, _DictWrapper, _TupleWrapper); their own __deepcopy__ copies
# their items with copy.deepcopy, which would pickle a Keras layer among
# them by saving a file. Detected by module; TensorFlow is not imported.
_TF_DATA_STRUCTURES = "tensorflow.python.trackable.data_structures"
_TF_WRAPPER_FLAGS = (
    "_non_append_mutation",
    "_external_modification",
    "_self_external_modification",
    "_self_non_string_key",
)


def _copy_tf_wrapper(obj, copier):
    """A TensorFlow data-structure wrapper made as its ``__deepcopy__`` makes
    it, around a copy of its items made by the copier."""
    wrapped = getattr(obj, "__wrapped__", None)
    inner = wrapped if wrapped is not None else obj._storage
    duplicate = type(obj)((yield ".__wrapped__", inner))
    for flag in _TF_WRAPPER_FLAGS:
        if flag in dir(obj):
            setattr(duplicate, flag, getattr(obj, flag))
    copier.remember(obj, duplicate)
    return duplicate


def _shared(obj, copier):
    copier.remember(obj, obj)
    return obj
    yield  # a generator that asks for nothing


def _new_shell(obj, copier):
    """A new object of ``obj``'s class, made by its ``__new__`` (a layer's
    makes its own build wrappers), without the attributes ``__new__`` set
    that ``obj`` does not have."""
    cls = type(obj)
    duplicate = cls.__new__(cls)
    for key in [k for k in vars(duplicate) if k not in vars(obj)]:
        if key not in _PER_OBJECT:
            object.__delattr__(duplicate, key)
    copier.remember(obj, duplicate)
    return duplicate


def _attributes(obj) -> Iterable[tuple[str, object, bool]]:
    """``(key, value, copy)`` for every attribute of a Keras object that a
    copy gets: ``copy`` False for a value shared with the original."""
    for key, value in vars(obj).items():
        if key in _PER_OBJECT:
            continue
        if key in _TRANSIENT:
            yield key, _TRANSIENT[key](), False
        elif key in _COMPILED or key in _SHARDINGS:
            yield key, None, False
        elif key == _TF_DEPENDENCY_NAMES and isinstance(value, dict):
            yield key, {k: v for k, v in value.items() if k not in _COMPILED}, True
        elif key == _TF_DEPENDENCIES and isinstance(value, list):
            kept = [ref for ref in value if getattr(ref, "name", None) not in _COMPILED]
            yield key, kept, True
        else:  # a distribution strategy is shared, as Keras's own clones do
            yield key, value, "strategy" not in key


def _copy_keras_object(obj, copier):
    """Atomic attributes (its name, flags) first, so that the copy, while its
    other attributes are being copied, already hashes and prints as Keras
    expects (it may be met again, as a dict key, before it is complete)."""
    duplicate = _new_shell(obj, copier)
    pending = []
    for key, value, deep in list(_attributes(obj)):
        if deep and not copier.is_atomic(value):
            pending.append((key, value))
        else:
            object.__setattr__(duplicate, key, value)
    for key, value in pending:
        object.__setattr__(duplicate, key, (yield f".{key}", value))
    return duplicate


def _copy_tracker(tracker, copier):
    duplicate = yield from _copy_keras_object(tracker, copier)

    def record_stores():  # once every store is filled
        duplicate.stored_ids = {
            name: {id(value) for value in store}
            for name, (_, store) in duplicate.config.items()
        }

    copier.finally_(record_stores)
    return duplicate


def _copy_tracked_container(container, copier):
    """A tracked list, dict or set, filled through its builtin base class so
    that its items are not tracked again (the copied tracker has them)."""
    duplicate = _new_shell(container, copier)
    for key, value in list(vars(container).items()):
        object.__setattr__(duplicate, key, (yield f".{key}", value))
    base = next(
        c
        for c in type(container).__mro__
        if c.__module__ in ("builtins", "collections")
    )
    if isinstance(container, dict):
        for key, value in list(container.items()):
            base.__setitem__(
                duplicate, (yield "{key}", key), (yield f"[{key!r}]", value)
            )
    elif isinstance(container, set):
        for value in list(container):
            base.add(duplicate, (yield "{item}", value))
    else:
        for i, value in enumerate(list(container)):
            base.append(duplicate, (yield f"[{i}]", value))
    return duplicate
