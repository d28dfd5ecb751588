# Two commands do everything on a fresh machine:
#   make app    set up the light install (first use only: ONNX Runtime, NumPy, Pillow, PyAV, Gradio; no torch) and
#               start the web app on the shipped model
#   make test   set up everything (first use only: torch and the [train,app,dev,ray] extras, so the training and
#               cluster tests run), install Chromium and exiftool for the tests that use them where apt-get can, and
#               run the test suite (the light commands too, in subprocesses where torch cannot be imported);
#               .ci/run is exactly `make test`
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: app test setup light browser tools clean

setup: $(VENV)/.installed
light: $(VENV)/.light

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	test -x $(BIN)/pip || $(BIN)/python -m ensurepip --quiet  # a light venv (make app) has no pip of its own
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e '.[train,app,dev,ray]'
	touch $@ $(VENV)/.light

# --no-compile: bytecode is written for what runs, not for every module of every package (~100 MB); the venv gets
# no pip of its own (17 MB) where this python's pip can install into it (pip >= 22.3: --python)
LIGHT_PIP = $(PYTHON) -m pip --python $(BIN)/python
$(VENV)/.light: pyproject.toml
	test -x $(BIN)/python || { $(PYTHON) -c "import pip, sys; sys.exit(tuple(map(int, pip.__version__.split('.')[:2])) \
	  < (22, 3))" 2>/dev/null && $(PYTHON) -m venv --without-pip $(VENV); } || $(PYTHON) -m venv $(VENV)
	{ test -x $(BIN)/pip && $(BIN)/pip install --quiet --no-compile -e '.[app]'; } \
	  || $(LIGHT_PIP) install --quiet --no-compile -e '.[app]'
	touch $@

app: light
	$(BIN)/python app.py

test: setup tools
	$(BIN)/python -m pytest -q

# System tools some tests use, from Debian: Chromium (/usr/bin/chromium, the browser test) and exiftool
# (--write-metadata and its independent read-back). Installed here when apt-get is there and we may use it (root);
# otherwise one line says how, and the tests that need them skip with the same advice.
TOOLS_HINT = run: sudo apt-get install chromium libimage-exiftool-perl; tests that need them will skip
browser tools:
	@{ test -x /usr/bin/chromium && command -v exiftool >/dev/null; } || { command -v apt-get >/dev/null && \
	  [ "$$(id -u)" = 0 ] && apt-get update -qq && apt-get install -y -qq chromium libimage-exiftool-perl >/dev/null; } \
	  || echo "make: chromium or exiftool is missing ($(TOOLS_HINT))"

clean:
	rm -rf $(VENV) cache runs

# ---- reproduce the reported numbers (README "Results", MODEL_CARD.md) --------------------
DATA ?= ../shared/data
GENERAL_DATA = --data flickr8k:$(DATA)/flickr8k --data coco:$(DATA)/coco
# the shipped model trains the encoder's last stage too (FINETUNE=1, on cached trunk activations; the self-critical
# stage goes on with it) at two threads: the figures in MODEL_CARD.md are bit-reproducible at that thread count
# (matmul results depend on it). The feature caches are filled first at the default thread count (fp32, the same on
# every CPU). The previous release (frozen encoder) is `make model FINETUNE=0 THREADS=1`.
# what both stages share: the data, 4 cached views streamed from disk, batches of 100
FINETUNE ?= 1
THREADS ?= 2
OUT = runs/general$(if $(filter 0,$(FINETUNE)),,-ft$(FINETUNE))
RUN_FLAGS = $(GENERAL_DATA) --views 4 --batch-size 100 --threads $(THREADS) --ram-gb 0
GENERAL_FLAGS = $(RUN_FLAGS) --min-count 5 --lr 5e-4 --alpha-c 0.1 --penalty mean --label-smoothing 0.1 \
	--lr-patience 1 --patience 4 --epochs 14 --attributes true --ema 0.995 --seed 0 --ema-warmup true --dropout 0.3 \
	--hidden-dim 384 --embed-dim 384 --feat-proj 384 --attn-dim 256 --finetune $(FINETUNE)
# self-critical training from the teacher-forced model (issue 24): CIDEr-D reward with <end>, samples without dropout,
# the mean of the other samples as baseline, best epoch by dev CIDEr-D
SCST_EPOCHS = $(if $(filter 0,$(FINETUNE)),8,12)
SCST_FLAGS = $(RUN_FLAGS) --init $(OUT)/best.pt --scst true --scst-dropout false --scst-end true --select cider \
	--lr 5e-5 --epochs $(SCST_EPOCHS) --lr-patience 2 --patience 3 --seed 0
TEST = --split test --beam 3 --no-repeat-words on --meteor

.PHONY: model ucm
model: setup  ## rebuild the shipped model: captioner/assets/model.pt and its ONNX bundle assets/model/ (resumable: run it again after an interruption)
	$(BIN)/captioner cache $(GENERAL_DATA) --views 4 --finetune $(FINETUNE)
	$(BIN)/captioner train $(GENERAL_FLAGS) --out $(OUT) --resume
	$(BIN)/captioner train $(SCST_FLAGS) --out $(OUT)-scst --resume
	$(BIN)/captioner evaluate --model $(OUT)-scst/best.pt --data flickr8k:$(DATA)/flickr8k $(TEST) --baseline -o $(OUT)-scst/test-flickr8k.jsonl
	$(BIN)/captioner evaluate --model $(OUT)-scst/best.pt --data coco:$(DATA)/coco $(TEST) -o $(OUT)-scst/test-coco.jsonl
	$(BIN)/captioner export $(OUT)-scst/best.pt captioner/assets/model.pt --beam 3 --no-repeat-words on
	$(BIN)/captioner export-onnx captioner/assets/model.pt captioner/assets/model --overwrite

ucm: setup  ## the UCM-Captions (aerial) model and its test BLEU
	$(BIN)/captioner train --data $(DATA)/ucm-captions --out runs/ucm --epochs 15 --seed 0 --lr 1e-3 --alpha-c 0.1 --penalty sum --label-smoothing 0.1 --lr-patience 2 --patience 4 --views 4 --ema 0.995 --threads 1
	$(BIN)/captioner evaluate --model runs/ucm/best.pt --data $(DATA)/ucm-captions --split test --beam 3
