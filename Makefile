# Two commands set everything up: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO := runs/demo
# digits are 32x32 centred strokes: no flips, mild crops, no eval centre-crop
DIGITS := --input-size 32 --batch-size 64 --set data.hflip=0 --set "data.scale=[0.6,1.0]" --set data.crop_pct=1.0 --set schedule.warmup_epochs=2

.PHONY: venv demo demo-seg test clean

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

# Segmentation: digit scenes (VOC layout, 64 px), a DeepLabV3+ resnet18 teacher from scratch, a
# DeepLabV3+ over timm's mobilenetv3_small_100 student (1/6 of the parameters) distilled with LONDON.
SEG_DEMO ?= runs/demo-seg
SEG_IMAGES ?= 1000
SEG_TEACHER_EPOCHS ?= 8
SEG_STUDENT_EPOCHS ?= 8
SEG := --input-size 64 --batch-size 16 --lr 0.002 --set schedule.optimizer=adamw --set schedule.weight_decay=1e-4 --set schedule.warmup_epochs=1

demo-seg: venv
	rm -rf $(SEG_DEMO)
	$(BIN)/lcdistill data digit-scenes $(SEG_DEMO)/scenes --images $(SEG_IMAGES)
	$(BIN)/lcdistill train --model smp:DeepLabV3Plus:resnet18 --data $(SEG_DEMO)/scenes --epochs $(SEG_TEACHER_EPOCHS) $(SEG) --out $(SEG_DEMO)/teacher
	$(BIN)/lcdistill compress --teacher $(SEG_DEMO)/teacher --student smp:DeepLabV3Plus:tu-mobilenetv3_small_100 --data $(SEG_DEMO)/scenes \
		--method london --epochs $(SEG_STUDENT_EPOCHS) $(SEG) --out $(SEG_DEMO)/student
	$(BIN)/lcdistill export $(SEG_DEMO)/student --format all --quantize int8 --tolerance 0.01 --out $(SEG_DEMO)/export
	$(BIN)/lcdistill eval $(SEG_DEMO)/student --data $(SEG_DEMO)/scenes --exports $(SEG_DEMO)/export --save $(SEG_DEMO)/eval.json
	$(BIN)/lcdistill report $(SEG_DEMO)/student --data $(SEG_DEMO)/scenes --eval $(SEG_DEMO)/eval.json

# two pytest workers, one per core (each test runs on one thread); a file stays in one worker so its fixtures are made once
test: venv
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

clean:
	rm -rf $(VENV) runs .pytest_cache
