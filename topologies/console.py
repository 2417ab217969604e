"""The Mininet CLI of `p4seg up --keep`, spoken in inventory names.

Mininet's CLI reads a node name as the first word of a line only if it is made of letters,
digits and `_` (Python's `cmd` module), and `py` sees nodes as Python variables; a floor's
Mininet names are short stand-ins (topologies/names.py). `FloorCLI` therefore rewrites a line
that starts with an inventory name before Mininet reads it:

    hdb-replica-primary-01 ping -c1 tor-east     ->  hdbr3c1a ping -c1 tor-east
    algo1 ping -c1 hdb-replica-primary-01        ->  algo1 ping -c1 10.0.4.20

(the first word becomes the node, later words that name hosts become their addresses, as
Mininet does for its own names), the node-taking commands (`link`, `iperf`, `switch`,
`xterm`, ...) accept inventory names, and `py` has `node['hdb-replica-primary-01']` and
every inventory name that is a Python identifier.
"""

from __future__ import annotations

import keyword
import re
from collections.abc import Mapping
from typing import Any

from mininet.cli import CLI

from topologies.names import RESERVED
from topologies.network import Floor

# Mininet CLI commands whose arguments are node names (the rest of `noecho` is a node line).
NODE_ARGUMENT_COMMANDS = frozenset({"iperf", "iperfudp", "link", "switch", "xterm", "gterm", "x"})
_FIRST = re.compile(r"\s*(\S+)(?:\s+(.*))?", re.DOTALL)


def node_command(line: str, nodes: Mapping[str, str], addresses: Mapping[str, str]) -> str | None:
    """`line` with Mininet's names, if it is a command for an inventory node (its first word
    an inventory name, then a command); else None. `nodes`: inventory name -> Mininet name;
    `addresses`: host inventory name -> address, substituted in the command's words.

        >>> node_command("hdb-1 ping -c1 web-2", {"hdb-1": "hdb1f00d", "web-2": "web2beef"},
        ...              {"hdb-1": "10.0.0.1", "web-2": "10.0.0.2"})
        'hdb1f00d ping -c1 10.0.0.2'
    """
    m = _FIRST.fullmatch(line.rstrip("\n"))
    if m is None or m[1] not in nodes or not (m[2] or "").strip():
        return None
    # Split on single spaces, as Mininet does, so that the command's own spacing survives.
    words = [addresses.get(w, w) for w in m[2].split(" ")]
    return f"{nodes[m[1]]} {' '.join(words)}"


def mininet_arguments(line: str, nodes: Mapping[str, str]) -> str:
    """A Mininet command's line with inventory names in its node arguments replaced by
    Mininet's names (`link tor-east hdb-1 down` -> `link tor1a2b3 hdb1f00d down`)."""
    m = _FIRST.fullmatch(line.rstrip("\n"))
    if m is None or m[1] not in NODE_ARGUMENT_COMMANDS or not m[2]:
        return line
    return " ".join([m[1], *(nodes.get(w, w) for w in m[2].split())])


class FloorCLI(CLI):  # type: ignore[misc]  # mininet is untyped
    """Mininet's CLI on a floor, taking inventory names wherever it takes node names.

    Like Mininet's, the constructor runs the CLI: interactively on `stdin`, or the commands
    of `script` (a file name) and returns.
    """

    def __init__(self, floor: Floor, **kwargs: Any) -> None:
        self.floor = floor
        self.nodes = dict(floor.node_names)
        self.addresses = {h.name: h.ip_text for h in floor.inventory.hosts}
        super().__init__(floor.net, **kwargs)

    def onecmd(self, line: str) -> Any:
        # An inventory name wins over a CLI command of the same name when a command follows.
        translated = node_command(line, self.nodes, self.addresses)
        if translated is not None:
            self.default(translated)
            return None
        return super().onecmd(mininet_arguments(line, self.nodes))

    def do_noecho(self, line: str) -> None:
        """Run an interactive command with echoing turned off.
        Usage: noecho <node> [cmd args]"""
        super().do_noecho(node_command(line, self.nodes, self.addresses) or line)

    def getLocals(self) -> dict[str, Any]:  # Mininet's name
        """`py`'s variables: Mininet's, `node[inventory name]`, and each inventory name
        that is a Python identifier."""
        local: dict[str, Any] = super().getLocals()
        by_inventory = {name: self.mn[short] for name, short in self.nodes.items()}
        local["node"] = by_inventory
        local.update(
            {
                n: v
                for n, v in by_inventory.items()
                if n.isidentifier() and not keyword.iskeyword(n) and n not in RESERVED
            }
        )
        return local
