"""The event listeners one bound engine's pieces install, kept so that unbind removes them.

``keys.bind(engine)`` installs listeners on the engine for its tracker, its
row keys (read prefetch, Core write hook) and the write hooks of migrating
and unique columns (:mod:`sa_envelope.wiring`). ``keys.unbind(engine)`` must
take back exactly those, and nothing another manager bound to the same
engine still needs. So every piece listens through the binding's
:class:`Listeners`:

* :meth:`Listeners.listen`: a listener of this binding alone (a method of
  its tracker, a closure over its row keys), removed with it;
* :meth:`Listeners.share`: a module-level listener that every manager bound
  to the engine shares (installed once per engine, as before): counted per
  engine, removed when the last binding that asked for it goes.

Class-level listeners (on ``Engine``, ``Session``, ``Mapper``: the statement
clock, the flush checks, the search writes) serve every engine and stay.
"""

from __future__ import annotations

import threading
import weakref
from typing import Any, Callable

from sqlalchemy import event

__all__ = ["Listeners"]

_shared: weakref.WeakKeyDictionary[Any, dict[tuple[str, Callable[..., Any]], int]] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


class Listeners:
    """The listeners installed on ``engine`` for one binding."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self._own: list[tuple[str, Callable[..., Any]]] = []
        self._shared: list[tuple[str, Callable[..., Any]]] = []

    def listen(self, name: str, fn: Callable[..., Any], **kw: Any) -> None:
        """Listen to ``name`` on the engine for this binding only."""
        event.listen(self.engine, name, fn, **kw)
        self._own.append((name, fn))

    def share(self, name: str, fn: Callable[..., Any], **kw: Any) -> None:
        """Listen with a listener every binding of the engine shares (once per engine)."""
        with _lock:
            counts = _shared.setdefault(self.engine, {})
            if (name, fn) in self._shared:
                return
            counts[(name, fn)] = counts.get((name, fn), 0) + 1
            if counts[(name, fn)] == 1:
                event.listen(self.engine, name, fn, **kw)
            self._shared.append((name, fn))

    def remove(self) -> None:
        """Remove this binding's listeners, and the shared ones no other binding still uses."""
        own, self._own = self._own, []
        for name, fn in own:
            event.remove(self.engine, name, fn)
        with _lock:
            shared, self._shared = self._shared, []
            counts = _shared.get(self.engine, {})
            for name, fn in shared:
                counts[(name, fn)] -= 1
                if counts[(name, fn)] == 0:
                    del counts[(name, fn)]
                    event.remove(self.engine, name, fn)

    def __len__(self) -> int:
        return len(self._own) + len(self._shared)
