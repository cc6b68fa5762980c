# Two commands set everything up: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO := runs/demo
# digits are 32x32 centred strokes: no flips, mild crops, no eval centre-crop
DIGITS := --input-size 32 --batch-size 64 --set data.hflip=0 --set "data.scale=[0.6,1.0]" --set data.crop_pct=1.0 --set schedule.warmup_epochs=2

.PHONY: venv demo test clean

venv: $(BIN)/.installed

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

demo: venv
	rm -rf $(DEMO)
	$(BIN)/lcdistill data digits $(DEMO)/digits
	$(BIN)/lcdistill train --model resnet18 --data $(DEMO)/digits --epochs 10 --lr 0.1 $(DIGITS) --out $(DEMO)/teacher
	$(BIN)/lcdistill compress --teacher $(DEMO)/teacher --student mobilenetv2_050 --data $(DEMO)/digits \
		--method london --epochs 15 --lr 0.02 $(DIGITS) --out $(DEMO)/student
	$(BIN)/lcdistill export $(DEMO)/student --format all --quantize int8 --out $(DEMO)/export
	$(BIN)/lcdistill eval $(DEMO)/student --data $(DEMO)/digits --exports $(DEMO)/export --save $(DEMO)/eval.json
	$(BIN)/lcdistill report $(DEMO)/student --data $(DEMO)/digits --eval $(DEMO)/eval.json

test: venv
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache
