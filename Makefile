# Two commands do everything on a fresh machine:
#   make app    set up (first use only) and start the web app on the shipped model
#   make test   set up (first use only), install Chromium for the browser test where apt-get can, and run
#               the test suite; .ci/run is exactly `make test`
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin

.PHONY: app test setup browser clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

app: setup
	$(BIN)/python app.py

test: setup browser
	$(BIN)/python -m pytest -q

# The browser test drives Debian's Chromium (/usr/bin/chromium). Installed here when apt-get is there and we may
# use it (root); otherwise one line says how, and tests/test_browser.py skips with the same advice.
CHROMIUM_HINT = chromium is not installed (run: sudo apt-get install chromium), so the browser test will skip
browser:
	@test -x /usr/bin/chromium || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	  apt-get update -qq && apt-get install -y -qq chromium >/dev/null; } || echo "make: $(CHROMIUM_HINT)"

clean:
	rm -rf $(VENV) cache runs

# ---- reproduce the reported numbers (README "Results", MODEL_CARD.md) --------------------
DATA ?= ../shared/data
GENERAL_FLAGS = --data flickr8k:$(DATA)/flickr8k --data coco:$(DATA)/coco --epochs 30 --views 8 \
	--min-count 3 --lr 1e-3 --alpha-c 0.1 --label-smoothing 0.1 --lr-patience 3 --patience 8 \
	--attributes true --hidden-dim 256 --feat-proj 256 --ema 0.99 --seed 0

.PHONY: model ucm
model: setup  ## rebuild the shipped default model captioner/assets/model.pt
	$(BIN)/captioner train $(GENERAL_FLAGS) --out runs/general
	$(BIN)/captioner evaluate --model runs/general/best.pt --data flickr8k:$(DATA)/flickr8k --data coco:$(DATA)/coco --split test --beam 3 --baseline
	$(BIN)/captioner export runs/general/best.pt captioner/assets/model.pt --beam 3

ucm: setup  ## the UCM-Captions (aerial) model and its test BLEU
	$(BIN)/captioner train --data $(DATA)/ucm-captions --out runs/ucm --epochs 15 --seed 0 --lr 1e-3 --alpha-c 0.1 --label-smoothing 0.1 --lr-patience 2 --patience 4 --views 4 --ema 0.995
	$(BIN)/captioner evaluate --model runs/ucm/best.pt --data $(DATA)/ucm-captions --split test --beam 3
