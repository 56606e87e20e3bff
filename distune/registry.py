"""One registry per plugin axis (methods, tasks, teacher signals): classes registered by name with a decorator, or
found through an entry-point group (a third-party package's, `pip install`ed). Imports nothing of distune."""

from __future__ import annotations

from importlib.metadata import entry_points


class Registry:
    """`what` names the kind in messages; `group` is the entry-point group; `base` the class every entry derives from."""

    def __init__(self, what: str, group: str, base: type):
        self.what, self.group, self.base = what, group, base
        self.entries: dict[str, type] = {}

    def register(self, name: str):
        """Class decorator: `@registry.register("lora")`; sets the class's `name`."""

        def deco(cls: type) -> type:
            if name in self.entries and self.entries[name] is not cls:
                raise ValueError(f"{self.what} {name!r} is already registered by {self.entries[name].__module__}")
            cls.name = name
            self.entries[name] = cls
            return cls

        return deco

    def _entry_points(self) -> dict:
        return {ep.name: ep for ep in entry_points(group=self.group)}

    def get(self, name: str) -> type:
        """The class registered as `name`, loading its entry point first where a package declares one; KeyError
        naming what is known otherwise."""
        if name not in self.entries:
            ep = self._entry_points().get(name)
            if ep is None:
                raise KeyError(f"unknown {self.what} {name!r}; known: {', '.join(self.known())}")
            obj = ep.load()  # a subclass of base, or a module that registers one on import
            if isinstance(obj, type) and issubclass(obj, self.base) and name not in self.entries:
                self.register(name)(obj)
            if name not in self.entries:
                raise KeyError(f"entry point {ep.value} did not provide a {self.what} named {name!r}")
        return self.entries[name]

    def check(self, name: str) -> str:
        """`name`, when it names an entry (a config validator's check); ValueError with get's message otherwise."""
        try:
            self.get(name)
        except KeyError as e:
            raise ValueError(e.args[0]) from None
        return name

    def known(self) -> list[str]:
        return sorted(set(self.entries) | set(self._entry_points()))
