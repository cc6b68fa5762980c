"""Method registry. A method is the task's supervised loss ("ce") plus terms joined by '+':
`--method kd+london`. Adding a term is one file under methods/ and one entry in TERMS; its recipe
section and defaults come from the term class, so recipe.py never changes for it.

At most one logit term (kd, dkd, dist) per method; feature terms (ofd, cwd) and the Lipschitz term
(london) add to it. A term that reads another's work (london on ofd's connected maps) declares it in
`after` and is built and run after it."""

from __future__ import annotations

from lcdistill.errors import UserError
from lcdistill.methods.base import Context, Distiller, Step, Term
from lcdistill.methods.cwd import CWD
from lcdistill.methods.dist import DIST
from lcdistill.methods.dkd import DKD
from lcdistill.methods.kd import KD
from lcdistill.methods.london import London
from lcdistill.methods.ofd import OFD
from lcdistill.methods.pkd import PKD

TERMS: dict[str, type[Term]] = {t.name: t for t in (KD, DKD, DIST, OFD, CWD, PKD, London)}
# Names kept for what they always meant: `london` is ce + kd + the Lipschitz term (the paper's
# LONDON, ce + OFD + Lipschitz, is `ofd+london`).
ALIASES: dict[str, list[str]] = {"ce": [], "kd": ["kd"], "london": ["kd", "london"]}
METHODS = tuple(ALIASES)  # the names `lcdistill methods` lists first
LOGIT_TERMS = tuple(n for n, t in TERMS.items() if t.logit)


def terms_of(method: str) -> list[type[Term]]:
    """The term classes a method name stands for, in the order their losses are summed."""
    if method in ALIASES:
        names = ALIASES[method]
    else:
        names = [part.strip() for part in str(method).split("+")]
        names = [n for n in names if n != "ce"]  # ce is always there
        if len(set(names)) != len(names) or not all(n in TERMS for n in names):
            bad = next((n for n in names if n not in TERMS), method)
            raise UserError(f"unknown method '{method}'" + (f" (no term '{bad}')" if bad != method else ""),
                            f"choose one of: {', '.join(METHODS)}, or terms joined by '+' from: {', '.join(TERMS)}")
    logits = [n for n in names if TERMS[n].logit]
    if len(logits) > 1:
        raise UserError(f"method '{method}' has {len(logits)} logit terms ({', '.join(logits)}): one logit term per method",
                        f"keep one of {', '.join(LOGIT_TERMS)}")
    # a term that reads another's maps (london after ofd) comes after it; the rest keep their order
    return sorted((TERMS[n] for n in names), key=lambda t: any(a in names for a in t.after))


def needs_teacher(method: str) -> bool:
    return any(t.needs_teacher for t in terms_of(method))


def sections() -> dict[str, dict]:
    """Each term's recipe section with its defaults (the recipe's defaults include them)."""
    return {t.section: dict(t.defaults) for t in TERMS.values()}


def validate(recipe: dict) -> None:
    """The method name, then every term's own section (a recipe carries them all)."""
    terms_of(recipe["method"])
    for term in TERMS.values():
        term.validate(recipe[term.section])


def build_terms(recipe: dict, task, student, teacher) -> list[Term]:
    """The terms of recipe['method'] for this student and teacher; each gets its own recipe section, and
    sees the terms built before it (ctx.peers)."""
    ctx = Context(student, teacher, task, input_size=recipe["data"]["input_size"])
    terms = []
    for t in terms_of(recipe["method"]):
        if not t.serves(task):
            missing = " and ".join(sorted(t.needs - task.offers)) or "dense"
            raise UserError(f"method {t.name} needs {missing} predictions or features, which {task.name} models do not give",
                            f"choose terms {task.name} serves: {', '.join(served(task))}")
        terms.append(t(recipe[t.section], ctx))
        ctx.peers[t.name] = terms[-1]
    return terms


def build(recipe: dict, task, student, teacher, student_cfg: dict, teacher_cfg: dict | None) -> Distiller:
    """The Distiller of recipe['method'] (the task's supervised loss weighted by recipe['loss'], then the terms)."""
    return Distiller(student, teacher, task, build_terms(recipe, task, student, teacher), recipe["loss"], student_cfg, teacher_cfg)


def served(task) -> list[str]:
    """The terms a task's models serve (`lcdistill methods`)."""
    return [n for n, t in TERMS.items() if t.serves(task)]


def describe_methods() -> list[tuple[str, str]]:
    """(name, what it is) of the named methods, for `lcdistill methods`."""
    return [(name, " + ".join(["ce", *ALIASES[name]])) for name in METHODS]


__all__ = ["served", "ALIASES", "LOGIT_TERMS", "METHODS", "TERMS", "Context", "Distiller", "Step", "Term", "build", "build_terms", "describe_methods",
           "needs_teacher", "sections", "terms_of", "validate"]
