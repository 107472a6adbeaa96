# caspec: the two commands a newcomer runs are `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.caspec-installed

.PHONY: setup demo review-demo toyworld test bench schema clean

setup: $(STAMP)

# One venv with the pinned stack (constraints.txt pins every transitive version for reproducible runs).
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

# The main job on the embedded `toy` model (trained on the shapes world): root -> SDEdit -> CLIP selection ->
# two-phase concept training (reduced steps) -> compose -> eval; then where to look.
demo: setup
	$(BIN)/caspec run specs/toy-demo.yaml
	$(BIN)/caspec eval specs/toy-demo.yaml
	@echo "open specs/out/toy-demo/index.html: every step, from the root to the metrics' plot" >&2
	@echo "and specs/out/toy-demo/new-colors/index.html: root | plain prompt | concept, seed for seed" >&2

# The review workflow on `toy` (real shapes to review): pause at a review gate, approve, resume; then open the
# gallery yourself with `caspec review specs/toy-review.yaml` (CLIP's decisions of `auto` are there too).
review-demo: setup
	rc=0; $(BIN)/caspec run specs/toy-review.yaml || rc=$$?; test $$rc -eq 3 -o $$rc -eq 0  # 3: paused for review
	$(BIN)/caspec review specs/toy-review.yaml --step picks --keep s0-p0-c0 s0-p1-c1
	$(BIN)/caspec run specs/toy-review.yaml
	$(BIN)/caspec plan specs/toy-review.yaml

# Retrain the toy models from scratch into the package (deterministic; about 45 min on 2 CPU cores).
toyworld: setup
	$(BIN)/caspec toyworld train --out caspec/toyworld/weights
	$(BIN)/caspec toyworld measure

test: setup
	scripts/ensure-browser   # Debian chromium for the review-gallery browser test (skipped if it cannot be had)
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q

bench: setup
	HF_HUB_OFFLINE=1 $(BIN)/python bench/overhead.py

schema: setup
	$(BIN)/caspec schema > caspec/spec/spec.schema.json

clean:
	rm -rf specs/.caspec specs/out specs/reviews
