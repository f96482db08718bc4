// The sharp side of benches/thumbnail.rs: makes thumbnails with sharp in this process, one
// request per line on stdin, and answers each with one JSON line on stdout.
//
// Request:  {"file": "...", "maxEdge": 320, "quality": 80, "format": "jpeg"|"png", "out": "..."?}
// Answer:   {"ms": 12.3, "width": 320, "height": 240, "bytes": 12345}
// The first line written is {"versions": {...}} (sharp, libvips and codec versions).
//
// sharp comes from SHARP_BENCH_DIR (a folder where `npm install sharp` ran); it is a benchmark
// baseline, never a dependency of the service. It runs on one thread (`concurrency(1)`) with the
// operation cache off, so every run decodes afresh, like ours.

import { createRequire } from 'node:module';
import { readFileSync, writeFileSync } from 'node:fs';
import { performance } from 'node:perf_hooks';
import path from 'node:path';
import readline from 'node:readline';

const require = createRequire(path.join(process.env.SHARP_BENCH_DIR ?? '.', 'package.json'));
const sharp = require('sharp');
sharp.concurrency(1);
sharp.cache(false);

const files = new Map();
const read = (file) => {
  if (!files.has(file)) files.set(file, readFileSync(file));
  return files.get(file);
};

console.log(JSON.stringify({ versions: sharp.versions, simd: sharp.simd() }));

const lines = readline.createInterface({ input: process.stdin });
for await (const line of lines) {
  if (!line.trim()) continue;
  const request = JSON.parse(line);
  const input = read(request.file);
  const started = performance.now();
  let pipeline = sharp(input)
    .rotate()
    .resize(request.maxEdge, request.maxEdge, { fit: 'inside', withoutEnlargement: true });
  pipeline =
    request.format === 'png' ? pipeline.png() : pipeline.jpeg({ quality: request.quality });
  const { data, info } = await pipeline.toBuffer({ resolveWithObject: true });
  const ms = performance.now() - started;
  if (request.out) writeFileSync(request.out, data);
  console.log(JSON.stringify({ ms, width: info.width, height: info.height, bytes: data.length }));
}
