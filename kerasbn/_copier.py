"""A deep copier with an explicit stack and rules of its own.

``copy.deepcopy`` recurses once per object along a path, and a model's graph
is a long path (layer, node, tensor, layer...): a deep model needs a raised
recursion limit and a large thread stack. Its hooks are process-wide:
``__deepcopy__`` on a class, or ``copy._deepcopy_dispatch``. :class:`Copier`
copies as ``copy.deepcopy`` does (a memo, the reduce protocol, the
``__deepcopy__`` of objects that define one), but keeps its work on a list
instead of the call stack, and takes its special cases from a rule that
serves this one copy. Nothing outside the copier changes while it runs.

A rule is a generator function ``rule(obj, copier)``: it makes the copy,
calls ``copier.remember(obj, copy)`` as soon as the copy exists (so that
cycles find it), ``yield``s ``(where, value)`` for each value it needs copied
and receives that value's copy, and returns the copy.
"""

from __future__ import annotations

import copyreg
import types
import weakref
from collections.abc import Callable, Generator

__all__ = ["CopyError", "Copier"]

Rule = Callable[[object, "Copier"], Generator]

_ATOMIC = (
    type(None),
    int,
    float,
    bool,
    complex,
    str,
    bytes,
    range,
    slice,
    type(Ellipsis),
    type(NotImplemented),
    types.BuiltinFunctionType,
    types.FunctionType,
    types.ModuleType,
    types.CodeType,
    property,
    weakref.ref,
)
_PENDING = object()


class CopyError(Exception):
    """Copying failed; the message says where, from the root down."""


class Copier:
    """Copies object graphs, with ``rule(obj)`` choosing a rule or None.

    Args:
        rule: returns the rule (a generator function, see the module) that
            copies ``obj``, or None for ``copy.deepcopy``'s way.
        describe: returns a short name of an object for error messages
            (``"layer 'conv'"``), or None.

    Example:
        >>> copier = Copier()
        >>> data = {"a": [1, 2]}
        >>> data["self"] = data
        >>> copied = copier.copy(data)
        >>> copied["self"] is copied and copied["a"] == [1, 2]
        True
    """

    def __init__(
        self,
        rule: Callable[[object], Rule | None] = lambda obj: None,
        describe: Callable[[object], str | None] = lambda obj: None,
    ):
        self.memo: dict[int, object] = {}
        self._rule = rule
        self._describe = describe
        self._originals: list = []  # keeps ids in the memo from being reused
        self._finally: list[Callable[[], None]] = []
        self.memo[id(self.memo)] = self._originals  # copy.deepcopy's convention

    def remember(self, original, duplicate) -> None:
        """Records that ``original`` is copied as ``duplicate``."""
        self.memo[id(original)] = duplicate
        if duplicate is not original:
            self._originals.append(original)

    def share(self, *objects) -> None:
        """Makes the copy use ``objects`` themselves, not copies."""
        for obj in objects:
            self.remember(obj, obj)

    @staticmethod
    def is_atomic(obj) -> bool:
        """Whether ``obj`` is its own copy (numbers, strings, functions...)."""
        cls = type(obj)
        return cls in _ATOMIC or issubclass(cls, type)

    def finally_(self, action: Callable[[], None]) -> None:
        """Runs ``action`` once the whole copy is made."""
        self._finally.append(action)

    def copy(self, root, name: str = "object"):
        """A deep copy of ``root``.

        Raises:
            CopyError: an object could not be copied; the message gives its
                path from ``root`` (``name``) and the error, which is chained.
        """
        value = self._ready(root)
        if value is not _PENDING:
            return value
        stack: list[tuple[Generator, str, object]] = [(self._task(root), name, root)]
        value = None
        while True:
            task = stack[-1][0]
            try:
                request = task.send(value)
            except StopIteration as stop:
                stack.pop()
                value = stop.value
                if not stack:
                    break
                continue
            except Exception as error:
                raise CopyError(
                    f"cannot copy {self._path(stack)}: {type(error).__name__}: {error}"
                ) from error
            where, obj = request
            value = self._ready(obj)
            if value is _PENDING:
                stack.append((self._task(obj), where, obj))
                value = None
        for action in self._finally:
            action()
        self._finally.clear()
        return value

    def _path(self, stack) -> str:
        parts = []
        for _, where, obj in stack:
            described = self._describe(obj)
            parts.append(f"{where} ({described})" if described else where)
        return "".join(parts) + f" ({type(stack[-1][2]).__name__})"

    def _ready(self, obj):
        """The copy of ``obj`` if it needs no work, else ``_PENDING``."""
        found = self.memo.get(id(obj), _PENDING)
        if found is not _PENDING:
            return found
        return obj if self.is_atomic(obj) else _PENDING

    def _task(self, obj) -> Generator:
        rule = self._rule(obj)
        if rule is not None:
            return rule(obj, self)
        cls = type(obj)
        if cls is list:
            return self._list(obj)
        if cls is dict:
            return self._dict(obj)
        if cls is tuple:
            return self._tuple(obj)
        deepcopy = getattr(cls, "__deepcopy__", None)
        if deepcopy is not None:
            return self._own(obj, deepcopy)
        return self._reduce(obj)

    def _list(self, obj):
        duplicate: list = []
        self.remember(obj, duplicate)
        for i, item in enumerate(obj):
            duplicate.append((yield f"[{i}]", item))
        return duplicate

    def _dict(self, obj):
        duplicate: dict = {}
        self.remember(obj, duplicate)
        for key, value in obj.items():
            key = yield f"[{key!r}]", key
            duplicate[key] = yield f"[{key!r}]", value
        return duplicate

    def _tuple(self, obj):
        items = []
        for i, item in enumerate(obj):
            items.append((yield f"[{i}]", item))
        if id(obj) in self.memo:  # a cycle through the tuple made it already
            return self.memo[id(obj)]
        duplicate = obj if all(a is b for a, b in zip(items, obj)) else tuple(items)
        self.remember(obj, duplicate)
        return duplicate

    def _own(self, obj, deepcopy):
        """An object that copies itself (NumPy and framework arrays, variables)."""
        duplicate = deepcopy(obj, self.memo)
        self.remember(obj, duplicate)
        return duplicate
        yield  # a generator that asks for nothing

    def _reduce(self, obj):
        """``copy.deepcopy``'s way: the reduce protocol, parts copied in turn."""
        cls = type(obj)
        reductor = copyreg.dispatch_table.get(cls)
        reduced = reductor(obj) if reductor else obj.__reduce_ex__(4)
        if isinstance(reduced, str):
            return obj
        function, args, state, items, entries = (*reduced, None, None, None)[:5]
        args = yield "", args
        duplicate = function(*args)
        self.remember(obj, duplicate)
        if state is not None:
            slots = None
            if isinstance(state, tuple) and len(state) == 2:
                state, slots = state
            if isinstance(state, dict):
                copied = {}
                for key, value in state.items():
                    copied[key] = yield f".{key}", value
                state = copied
            else:
                state = yield "", state
            if slots is not None:
                slots = yield "", slots
            setstate = getattr(type(duplicate), "__setstate__", None)
            if setstate is not None:
                setstate(duplicate, state if slots is None else (state, slots))
            else:
                if state:
                    duplicate.__dict__.update(state)
                for key, value in (slots or {}).items():
                    setattr(duplicate, key, value)
        for i, item in enumerate(items or ()):
            duplicate.append((yield f"[{i}]", item))
        for key, value in entries or ():
            key = yield f"[{key!r}]", key
            duplicate[key] = yield f"[{key!r}]", value
        return duplicate
