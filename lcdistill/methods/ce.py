"""Student alone with cross-entropy: the baseline every distillation method must beat."""

from lcdistill.methods.base import Distiller


class CE(Distiller):
    needs_teacher = False
