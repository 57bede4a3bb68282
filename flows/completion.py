"""Bash completion generated from the argument parser, so it cannot drift from the commands.

Completes sub-commands, each one's options, and recipe names (``params/*.yaml`` of
``$PAPERDAG_WORKSPACE`` or the current directory) where a command takes a recipe.
"""
from __future__ import annotations

import argparse

TEMPLATE = r"""# paperdag bash completion: source <(paperdag completion bash)
_paperdag() {
    local cur prev cmd
    cur="${COMP_WORDS[COMP_CWORD]}"
    prev="${COMP_WORDS[COMP_CWORD-1]}"
    cmd=""
    for w in "${COMP_WORDS[@]:1:COMP_CWORD-1}"; do
        case "$w" in -*) ;; *) cmd="$w"; break ;; esac
    done
    if [ -z "$cmd" ]; then
        COMPREPLY=( $(compgen -W "__COMMANDS__ __GLOBAL__" -- "$cur") )
        return
    fi
    if [ "$prev" = "--workspace" ]; then
        COMPREPLY=( $(compgen -d -- "$cur") )
        return
    fi
    local opts=""
    case "$cmd" in
__CASES__
    esac
    if [[ "$cur" == -* ]]; then
        COMPREPLY=( $(compgen -W "$opts" -- "$cur") )
    elif [[ " __RECIPE_COMMANDS__ " == *" $cmd "* ]]; then
        local root="${PAPERDAG_WORKSPACE:-.}" recipes=""
        for f in "$root"/params/*.yaml; do [ -e "$f" ] && recipes="$recipes $(basename "$f" .yaml)"; done
        COMPREPLY=( $(compgen -W "$recipes" -- "$cur") )
    else
        COMPREPLY=( $(compgen -f -- "$cur") )
    fi
}
complete -F _paperdag paperdag
"""


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def _options(parser: argparse.ArgumentParser) -> list[str]:
    return sorted(o for a in parser._actions for o in a.option_strings if a.help != argparse.SUPPRESS)


def bash_completion(parser: argparse.ArgumentParser) -> str:
    subs = _subparsers(parser)
    cases = "\n".join(f'        {name}) opts="{" ".join(_options(sp))}" ;;' for name, sp in subs.items())
    takes_recipe = [name for name, sp in subs.items() if any(a.dest == "recipe" for a in sp._actions)]
    return (TEMPLATE.replace("__COMMANDS__", " ".join(subs))
            .replace("__GLOBAL__", " ".join(_options(parser)))
            .replace("__CASES__", cases)
            .replace("__RECIPE_COMMANDS__", " ".join(takes_recipe)))
