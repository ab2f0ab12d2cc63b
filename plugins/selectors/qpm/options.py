"""The options the ``qpm`` selector declares (``--selector-option KEY=VALUE``, ``qpm select --bound``,
``select(..., selector_options=...)``, ``qpm plugins --json``). Light on purpose: the plugin's registration reads it
at discovery, so it imports nothing but the contract."""

from __future__ import annotations

from qpmcli.contracts import PluginOption

BOUND_CHOICES = ("lp", "sdp", "auto")

OPTIONS = (
    PluginOption("bound", "str", "auto",
                 "certified bound: lp (LP + clique cuts, in the search's cycle), sdp (semidefinite, SCS, in its own "
                 "thread) or auto (sdp where CP-SAT's exact model does not fit, up to 1,024 features, given >= 60 s "
                 "and two cores; else lp)", BOUND_CHOICES),
    PluginOption("candidates", "int", None,
                 "top-M candidate features per class of the bounds and of CP-SAT's restricted model (default: every "
                 "feature up to 64, else max(4k, min(n, 2K)))"),
    PluginOption("deterministic", "bool", True,
                 "CP-SAT in its deterministic mode: the same work gives the same selection"),
    PluginOption("work_limit", "int", None,
                 "stop after N cycles of the search (each: local-search rounds, a bound step, a CP-SAT chunk of "
                 "deterministic time) instead of at the clock: the same selection on every machine, unless the time "
                 "limit comes first (give a generous one); auto then takes the LP bound (the SDP runs on the clock)"),
)
