# Two commands set everything up: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
DEMO := runs/demo
# digits are 32x32 centred strokes: no flips, mild crops, no eval centre-crop
DIGITS := --input-size 32 --batch-size 64 --set data.hflip=0 --set "data.scale=[0.6,1.0]" --set data.crop_pct=1.0 --set schedule.warmup_epochs=2

.PHONY: venv demo demo-qat demo-prune demo-seg demo-det test clean

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

# Segmentation: digit scenes (VOC layout, 64 px), an FPN resnet18 teacher from scratch, an FPN over
# timm's mobilenetv3_small_100 student (1/5 of the parameters, under half the FLOPs) distilled with the
# segmentation task's default method, cwd (channel-wise distillation: over 8 seeds, benchmarks/RESULTS.md,
# kd 32.3 mIoU, kd + the Lipschitz term 34.4, cwd 43.3, cwd+london 42.5).
# Why these (probes on one core, 5 epochs on 2,000 scenes): from scratch the nets learn digit versus
# background first and which digit only later; FPN gets there sooner than Unet or DeepLabV3+, batch 8 gives
# twice the steps of 16, and the lr must be high (teacher 0.008: 62% mIoU where 0.002 gave 44%; student
# 0.04: 42% alone where 0.002 gave 16%); no flips (a mirrored digit is another shape), mild scale jitter.
# That schedule (AdamW, lr 0.008, batch 8, weight decay 1e-4, 1 warm-up epoch, scale 0.75-1.25, no flips) is
# the segmentation task's default (lcdistill/tasks/segmentation.py); the demo sets only the student's lr.
# 1,600 scenes, 5 epochs each (2026-12-04, torch 2.14): teacher 55.18% mIoU, the student 44.02% with cwd (33.62% with
# london before: following the task's default gained 10 points), int8 43.88%.
SEG_DEMO ?= runs/demo-seg
SEG_IMAGES ?= 1600
SEG_TEACHER_EPOCHS ?= 5
SEG_STUDENT_EPOCHS ?= 5
SEG := --input-size 64

demo-seg: venv
	rm -rf $(SEG_DEMO)
	$(BIN)/lcdistill data digit-scenes $(SEG_DEMO)/scenes --images $(SEG_IMAGES)
	$(BIN)/lcdistill train --model smp:FPN:resnet18 --data $(SEG_DEMO)/scenes --epochs $(SEG_TEACHER_EPOCHS) $(SEG) --out $(SEG_DEMO)/teacher
	$(BIN)/lcdistill compress --teacher $(SEG_DEMO)/teacher --student smp:FPN:tu-mobilenetv3_small_100 --data $(SEG_DEMO)/scenes \
		--epochs $(SEG_STUDENT_EPOCHS) --lr 0.04 $(SEG) --out $(SEG_DEMO)/student
	$(BIN)/lcdistill export $(SEG_DEMO)/student --format all --quantize int8 --out $(SEG_DEMO)/export
	$(BIN)/lcdistill eval $(SEG_DEMO)/student --data $(SEG_DEMO)/scenes --exports $(SEG_DEMO)/export --save $(SEG_DEMO)/eval.json
	$(BIN)/lcdistill report $(SEG_DEMO)/student --data $(SEG_DEMO)/scenes --eval $(SEG_DEMO)/eval.json

# Detection: digit scenes read as VOC detection (their Annotations/ boxes) at 64 px. From scratch an FCOS learns
# where the digits are long before which digit each is (8 epochs: 12 AP50, its label right on 11-13% of the boxes
# it finds: chance), and a backbone trained on `data digits` does not help: that classifier scores 10.8% on the
# coloured digit crops, so it knows nothing of the scenes' digits. What works is ImageNet's recipe, offline: each
# backbone learns the shapes on plain digits, then the coloured, randomly placed digit crops, and starts its
# detector (--init: every backbone tensor, FPN and head fresh). Both detectors have FCOS heads of 2 convs a tower
# (torchvision's 4 hold most of a 64 px detector's FLOPs; with 2 the student learnt the classes far sooner: 65.6
# AP50 against 44.5 after 8 epochs). The FCOS resnet18-FPN teacher is fine-tuned at lr 0.0005 (0.002, the
# from-scratch default, wipes what the backbone knows: 69 AP50 against 79); the FCOS mobilenet_v3_small-FPN student
# (the same P3-P7 grid, so the terms pair the levels one to one) is distilled from it with detection's default
# method, cwd (5 seeds: +5.7 mAP over the detector's loss alone; benchmarks/results/det_methods.md), at lr 0.002 (from a scratch backbone, with any method, it stays at 11-17 AP50). The pretraining sets come
# from the train half of the source digits: no val digit of the scenes is ever seen. 2026-12-06, fresh clone: teacher
# 79.2 AP50 / 52.8 mAP, label right on 81.6% of the boxes it finds; student 46.4 / 26.9 (5.7M params, 0.52 GFLOPs
# against the teacher's 16.8M, 0.82); 10 min 26 s on 2 cores (benchmarks/RESULTS.md).
DET_DEMO ?= runs/demo-det
DET_IMAGES ?= 1000
DET_TEACHER_EPOCHS ?= 10
DET_STUDENT_EPOCHS ?= 5
DET := --input-size 64 --set student.kwargs.head_convs=2
CROPS := --input-size 32 --batch-size 64 --set data.hflip=0 --set "data.scale=[0.6,1.0]" --set data.crop_pct=1.0 --set schedule.warmup_epochs=1

demo-det: venv
	rm -rf $(DET_DEMO)
	$(BIN)/lcdistill data digit-scenes $(DET_DEMO)/scenes --images $(DET_IMAGES)
	$(BIN)/lcdistill data digit-crops $(DET_DEMO)/plain --plain --train 3000 --val 500
	$(BIN)/lcdistill data digit-crops $(DET_DEMO)/crops --train 6000 --val 1000
	$(BIN)/lcdistill train --model resnet18 --data $(DET_DEMO)/plain --epochs 3 --lr 0.1 $(CROPS) --out $(DET_DEMO)/teacher-plain
	$(BIN)/lcdistill train --model resnet18 --init $(DET_DEMO)/teacher-plain --data $(DET_DEMO)/crops --epochs 4 --lr 0.05 \
		$(CROPS) --out $(DET_DEMO)/teacher-backbone
	$(BIN)/lcdistill train --model tv:mobilenet_v3_small --data $(DET_DEMO)/plain --epochs 3 --lr 0.1 $(CROPS) \
		--out $(DET_DEMO)/student-plain
	$(BIN)/lcdistill train --model tv:mobilenet_v3_small --init $(DET_DEMO)/student-plain --data $(DET_DEMO)/crops --epochs 2 \
		--lr 0.05 $(CROPS) --out $(DET_DEMO)/student-backbone
	$(BIN)/lcdistill train --model det:FCOS:resnet18 --init $(DET_DEMO)/teacher-backbone --data $(DET_DEMO)/scenes \
		--epochs $(DET_TEACHER_EPOCHS) --lr 0.0005 $(DET) --out $(DET_DEMO)/teacher
	$(BIN)/lcdistill compress --teacher $(DET_DEMO)/teacher --student det:FCOS:mobilenet_v3_small --init $(DET_DEMO)/student-backbone \
		--data $(DET_DEMO)/scenes --epochs $(DET_STUDENT_EPOCHS) --lr 0.002 $(DET) --out $(DET_DEMO)/student
	$(BIN)/lcdistill export $(DET_DEMO)/student --format all --out $(DET_DEMO)/export
	$(BIN)/lcdistill eval $(DET_DEMO)/student --data $(DET_DEMO)/scenes --exports $(DET_DEMO)/export --save $(DET_DEMO)/eval.json
	$(BIN)/lcdistill report $(DET_DEMO)/student --data $(DET_DEMO)/scenes --eval $(DET_DEMO)/eval.json

# Quantization-aware distillation where post-training quantization loses: `make demo`'s teacher and student, the student
# exported in float and quantized after training with int8 and with int4 weights (uint8 activations both), then fine-tuned
# quantization-aware for int4 weights (3 epochs at a tenth of its lr, the teacher guiding with the same method) and exported
# from what it learnt. `eval` of that run measures its int4 file beside the float run's fp32 and post-training files.
# Figures: benchmarks/RESULTS.md (benchmarks/qat.py holds the several-seed comparison).
QAT_DEMO ?= runs/demo-qat

demo-qat: venv
	rm -rf $(QAT_DEMO)
	$(BIN)/lcdistill data digits $(QAT_DEMO)/digits
	$(BIN)/lcdistill train --model resnet18 --data $(QAT_DEMO)/digits --epochs 10 --lr 0.1 $(DIGITS) --out $(QAT_DEMO)/teacher
	$(BIN)/lcdistill compress --teacher $(QAT_DEMO)/teacher --student mobilenetv2_050 --data $(QAT_DEMO)/digits \
		--method london --epochs 15 --lr 0.02 $(DIGITS) --out $(QAT_DEMO)/student
	$(BIN)/lcdistill export $(QAT_DEMO)/student --format onnx --quantize int8
	$(BIN)/lcdistill export $(QAT_DEMO)/student --format onnx --quantize int8 --weight-bits 4
	$(BIN)/lcdistill compress --teacher $(QAT_DEMO)/teacher --student $(QAT_DEMO)/student --data $(QAT_DEMO)/digits \
		--quantize int8 --set qat.weight_bits=4 --out $(QAT_DEMO)/student-qat
	$(BIN)/lcdistill export $(QAT_DEMO)/student-qat --format onnx --quantize int8
	$(BIN)/lcdistill eval $(QAT_DEMO)/student-qat --data $(QAT_DEMO)/digits --save $(QAT_DEMO)/eval.json
	$(BIN)/lcdistill report $(QAT_DEMO)/student-qat --eval $(QAT_DEMO)/eval.json

# A student cut from the teacher: `make demo`'s resnet18 teacher with channels removed until a quarter of its FLOPs
# are left (--student prune:0.25, Torch-Pruning by weight magnitude), distilled from the unpruned teacher with the
# task's default method; then the same cut distilled quantization-aware in one command (--quantize int8) and shipped
# as int8. `eval` shows each beside its teacher, with ONNX and int8 latency. Figures: benchmarks/RESULTS.md
# (benchmarks/prune.py holds the several-seed comparison with named students of the same FLOPs).
PRUNE_DEMO ?= runs/demo-prune

demo-prune: venv
	rm -rf $(PRUNE_DEMO)
	$(BIN)/lcdistill data digits $(PRUNE_DEMO)/digits
	$(BIN)/lcdistill train --model resnet18 --data $(PRUNE_DEMO)/digits --epochs 10 --lr 0.1 $(DIGITS) --out $(PRUNE_DEMO)/teacher
	$(BIN)/lcdistill students --data $(PRUNE_DEMO)/digits --teacher $(PRUNE_DEMO)/teacher --model prune:0.25 --model efficientnet_b0
	$(BIN)/lcdistill compress --teacher $(PRUNE_DEMO)/teacher --student prune:0.25 --data $(PRUNE_DEMO)/digits \
		--epochs 15 --lr 0.02 $(DIGITS) --out $(PRUNE_DEMO)/student
	$(BIN)/lcdistill export $(PRUNE_DEMO)/student --format onnx --quantize int8
	$(BIN)/lcdistill eval $(PRUNE_DEMO)/student --data $(PRUNE_DEMO)/digits --save $(PRUNE_DEMO)/eval.json
	$(BIN)/lcdistill compress --teacher $(PRUNE_DEMO)/teacher --student prune:0.25 --data $(PRUNE_DEMO)/digits \
		--epochs 15 --lr 0.02 $(DIGITS) --quantize int8 --out $(PRUNE_DEMO)/student-qat
	$(BIN)/lcdistill export $(PRUNE_DEMO)/student-qat --format onnx --quantize int8
	$(BIN)/lcdistill eval $(PRUNE_DEMO)/student-qat --data $(PRUNE_DEMO)/digits --save $(PRUNE_DEMO)/eval-qat.json

# two pytest workers, one per core (each test runs on one thread); a file stays in one worker so its fixtures are made once
test: venv
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

clean:
	rm -rf $(VENV) runs .pytest_cache
