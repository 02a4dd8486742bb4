# The two commands of the README. Both install what is missing first (scripts/setup.sh, quiet when
# everything is there).
CARGO ?= cargo
KILN_RELEASE := target/release/kiln

.PHONY: setup demo test
setup:
	@scripts/setup.sh

# Builds kiln and shows what it does on the real DeepSeek-V3 configuration.
demo: setup
	$(CARGO) build --release --quiet --bin kiln
	$(KILN_RELEASE) inspect models/deepseek_v3.toml
	$(KILN_RELEASE) ir models/deepseek_v3.toml --layer 3 | head -n 40
	$(KILN_RELEASE) doctor

# Every test of the workspace: unit tests, the integration tests in tests/it, doc tests.
test: setup
	$(CARGO) test --workspace --quiet
