# Jobsite: `make run` and `make test` do all the set-up on a fresh machine.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
PDEATHSIG := $(VENV)/bin/jobsite-pdeathsig

.PHONY: run test lint install clean

$(VENV)/.installed: requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	@touch $@

# The launcher that gives a job's process SIGKILL when its worker dies. A
# static binary starts in half the time of setpriv, which Jobsite uses when
# there is no C compiler to build this.
$(PDEATHSIG): jobs/native/pdeathsig.c $(VENV)/.installed
	@$(CC) -O2 -static -o $@ $< 2>/dev/null || $(CC) -O2 -o $@ $< 2>/dev/null \
		|| echo "note: no C compiler; jobs start through setpriv instead of $@"

install: $(VENV)/.installed $(PDEATHSIG)

run: $(VENV)/.installed $(PDEATHSIG)
	$(PY) manage.py migrate --noinput
	$(PY) manage.py createcachetable
	$(PY) manage.py collectstatic --noinput -v0
	$(PY) manage.py seed_demo
	$(PY) manage.py runall

test: $(VENV)/.installed $(PDEATHSIG)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

clean:
	rm -rf $(VENV) staticfiles .test-db.sqlite3*
