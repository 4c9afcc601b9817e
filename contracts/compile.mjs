#!/usr/bin/env node
// Compiles contracts/src/*.sol and contracts/test/*.sol (test-only contracts) with the pinned
// solc-js and writes one artifact per contract to contracts/artifacts/<Name>.json.
//
//   node compile.mjs [--out DIR]
//
// The output is deterministic (standard JSON input, explicit evmVersion, no metadata hash in the
// bytecode, keys sorted, trailing newline), so tests/contracts/test_artifacts.py can check that
// the committed artifacts equal a fresh compile byte for byte.
import fs from "node:fs";
import path from "node:path";
import { createRequire } from "node:module";
import { fileURLToPath } from "node:url";

const require = createRequire(import.meta.url);
const solc = require("solc");

const HERE = path.dirname(fileURLToPath(import.meta.url));
const SOURCE_DIRS = ["src", "test"];
const SOLC_VERSION = "0.8.37";
// py-evm 0.12.1b1 (eth-tester's backend, the embedded devnet) runs Prague, which includes every
// Cancun opcode; anvil and Base Sepolia support Cancun too.
const EVM_VERSION = "cancun";
const OPTIMIZER = { enabled: true, runs: 200 };

function parseArgs(argv) {
  let out = path.join(HERE, "artifacts");
  for (let i = 0; i < argv.length; i++) {
    if (argv[i] === "--out" && i + 1 < argv.length) {
      out = path.resolve(argv[++i]);
    } else {
      throw new Error(`unknown argument ${argv[i]} (usage: node compile.mjs [--out DIR])`);
    }
  }
  return { out };
}

function readSources() {
  const sources = {};
  for (const dir of SOURCE_DIRS) {
    const abs = path.join(HERE, dir);
    if (!fs.existsSync(abs)) continue;
    for (const name of fs.readdirSync(abs).sort()) {
      if (name.endsWith(".sol")) {
        sources[`${dir}/${name}`] = { content: fs.readFileSync(path.join(abs, name), "utf8") };
      }
    }
  }
  return sources;
}

// Imports such as "@openzeppelin/contracts/..." resolve inside node_modules only.
function findImports(importPath) {
  if (importPath.includes("..")) return { error: `refusing import path ${importPath}` };
  const abs = path.join(HERE, "node_modules", importPath);
  if (!fs.existsSync(abs)) return { error: `not found: ${importPath}` };
  return { contents: fs.readFileSync(abs, "utf8") };
}

function sortKeys(value) {
  if (Array.isArray(value)) return value.map(sortKeys);
  if (value && typeof value === "object") {
    const sorted = {};
    for (const key of Object.keys(value).sort()) sorted[key] = sortKeys(value[key]);
    return sorted;
  }
  return value;
}

function main() {
  const { out } = parseArgs(process.argv.slice(2));
  if (!solc.version().startsWith(`${SOLC_VERSION}+`)) {
    throw new Error(`solc ${solc.version()} found, ${SOLC_VERSION} pinned: run npm ci`);
  }
  const sources = readSources();
  const input = {
    language: "Solidity",
    sources,
    settings: {
      evmVersion: EVM_VERSION,
      optimizer: OPTIMIZER,
      metadata: { bytecodeHash: "none", appendCBOR: true },
      outputSelection: { "*": { "*": ["abi", "evm.bytecode.object", "evm.deployedBytecode.object"] } },
    },
  };
  const output = JSON.parse(solc.compile(JSON.stringify(input), { import: findImports }));
  let failed = false;
  let libraryWarnings = 0;
  for (const err of output.errors ?? []) {
    // warnings inside libraries (OpenZeppelin's note on its transient reentrancy guard) are
    // theirs to fix: counted, not printed; ours and every error are printed
    const file = err.sourceLocation?.file ?? "";
    if (err.severity !== "error" && !(file in sources)) {
      libraryWarnings += 1;
      continue;
    }
    process.stderr.write(`${err.formattedMessage ?? err.message}\n`);
    if (err.severity === "error") failed = true;
  }
  if (failed) process.exit(1);
  if (libraryWarnings) process.stderr.write(`(${libraryWarnings} warning(s) in libraries not shown)\n`);

  fs.mkdirSync(out, { recursive: true });
  const written = new Set();
  for (const sourceName of Object.keys(sources)) {
    for (const [contractName, contract] of Object.entries(output.contracts[sourceName] ?? {})) {
      const bytecode = contract.evm.bytecode.object;
      if (!bytecode) continue; // interfaces and abstract contracts have nothing to deploy
      if (written.has(contractName)) throw new Error(`two contracts named ${contractName}`);
      const artifact = sortKeys({
        contractName,
        abi: contract.abi,
        bytecode: `0x${bytecode}`,
        deployedBytecode: `0x${contract.evm.deployedBytecode.object}`,
        compiler: { solc: SOLC_VERSION, evmVersion: EVM_VERSION, optimizer: OPTIMIZER },
      });
      fs.writeFileSync(path.join(out, `${contractName}.json`), `${JSON.stringify(artifact, null, 2)}\n`);
      written.add(contractName);
    }
  }
  // an artifact whose contract is gone must not linger (only in our own artifacts folder)
  const own = path.resolve(out) === path.join(HERE, "artifacts");
  for (const name of own ? fs.readdirSync(out) : []) {
    if (name.endsWith(".json") && !written.has(name.slice(0, -5))) fs.unlinkSync(path.join(out, name));
  }
  process.stdout.write(`compiled ${[...written].sort().join(", ")} -> ${out}\n`);
}

main();
