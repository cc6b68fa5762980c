"""Method registry: a name -> Distiller subclass. Adding a method is one file and one line here."""

from lcdistill.methods.ce import CE
from lcdistill.methods.kd import KD
from lcdistill.methods.london import London

METHODS = {"ce": CE, "kd": KD, "london": London}
