# The two commands of the README. Each installs what it needs first.
PYTHON ?= python3

.PHONY: demo test install

install:
	$(PYTHON) -m pip install -q -e '.[test]'

# The main job: train a DDPM on two moons and draw 5,000 samples as a picture.
demo: install
	diffkit train examples/moons.yaml --out runs/moons --force
	diffkit sample runs/moons --n 5000 --seed 0 --out runs/moons/moons.png

# The full test suite. pytest's exit 5 (no tests collected) counts as a failure.
test: install
	$(PYTHON) -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests were collected" >&2; exit 1; fi; exit $$rc
