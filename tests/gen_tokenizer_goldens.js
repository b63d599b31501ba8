// Writes golden cases: diverse strings and the ids Hugging Face tokenizers gives them.
//   npm install tokenizers
//   node tests/gen_tokenizer_goldens.js TOKENIZER_JSON TEXT_FILE OUT.json
// TEXT_FILE is tinyshakespeare (data/tinyshakespeare.txt.xz, decompressed), where slices come from. The
// committed goldens: tests/tokenizer_goldens.json from Qwen3's tokenizer.json (data/qwen3-tokenizer/,
// decompressed), tests/demo_tokenizer_goldens.json from demo/tokenizer.json. Deterministic: the random
// mixes come from a seeded PRNG. Also used by test_tokenizer.py's live fuzz:
//   node tests/gen_tokenizer_goldens.js --fuzz SEED COUNT TOKENIZER_JSON OUT.json
const fs = require("fs");
const { Tokenizer } = require("tokenizers");

function mulberry32(seed) {
  return function () {
    seed = (seed + 0x6d2b79f5) | 0;
    let t = Math.imul(seed ^ (seed >>> 15), 1 | seed);
    t = (t + Math.imul(t ^ (t >>> 7), 61 | t)) ^ t;
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

const cp = (...xs) => String.fromCodePoint(...xs);
const range = (lo, hi) => { const s = []; for (let c = lo; c <= hi; c++) s.push(cp(c)); return s; };

// Hand-picked cases, one or more per hazard.
const FIXED = [
  "", "Hello world", " Hello world", "Hello, world!", "The quick brown fox jumps over the lazy dog.",
  "a", " ", "  ", "\n", "\n\n", "\r\n", "\r\n\r\n", "\t", "\t\t", "x ", "x  ", "x   \n", " \n x", "  x", "   x",
  "a\n\n\nb", "a \n \n b", "line1\r\nline2\r\n", "trailing spaces   ", "\ttab\tseparated\tvalues\t",
  "it's", "It'S", "I'M", "you'RE", "they'Ve", "we'LL", "she'D", "don't", "DON'T", "'s", "'S 'Ll 'rE 'vE 'M 'D 'T",
  "'sup", "'''", "x'", "''s", "'ſ", "'ſt", "naïve 'ſ'ſ", "'\u212A", "rock'n'roll", "O'Neil's",
  "12345", "3.14159", "1,000,000", "0x1F600", "2024-01-01T12:34:56Z", "123456789012345678901234567890",
  "\u0661\u0662\u0663 \u0969\u096A", "①②③ Ⅻ ½ ¾", "x²+y³", "𝟘𝟙𝟚",
  "def f(x):\n    return x + 1\n", "int main(void) { return 0; }\n", "for (int i = 0; i < n; i++) {\n\tsum += a[i];\n}",
  "    indented\n        more\n", "<html><body class=\"x\">hi</body></html>", "SELECT * FROM t WHERE a >= 10;",
  "https://example.com/path?q=1&r=2#frag", "user@example.com", "$ ls -la | grep '^d'", "a->b, a=>b, a::b, a...b",
  "!!!", "?!?!", "...\n", "--\n\n", "«quotes» “curly” ‘single’", "—em dash— –en dash–",
  "你好，世界！", "我爱自然语言处理。", "日本語のテキストです。カタカナ、ひらがな。", "한국어 텍스트입니다.",
  "Привет, мир! Как дела?", "ПРИВЕТ 'S", "مرحبا بالعالم", "नमस्ते दुनिया", "สวัสดีชาวโลก", "Γειά σου Κόσμε",
  "שלום עולם", "Ελληνικά και English mixed 中文 123", "ⴰⵣⵓⵍ", "ሰላም ልዑል", "ᏣᎳᎩ", "ꦲꦏ꧀ꦱꦫ",
  "😀", "👍🏽", "👨‍👩‍👧‍👦", "🏳️‍🌈", "👩🏿‍💻 and 🧑🏻‍🤝‍🧑🏾", "🇺🇸🇯🇵", "1️⃣ #️⃣", "❤️‍🔥", "x😀y", " 😀 ", "😀😀😀",
  "e\u0301", "cafe\u0301", "A\u030A", "\u212B", "\u1E9B\u0323", "a\u0328\u0301", "a\u0301\u0328", "o\u0308\u0304",
  "\u1100\u1161", "\u1100\u1161\u11A8", "\uAC00\u11A8", "\u1112\u1161\u11AB\u1100\u1173\u11AF", "\u1100 \u1161",
  "\uF900", "\uF900\uF901\uF902", "\u2F800", "\u{2F800}", "\u{2FA1D}", "\u0344", "\u0958", "\u2126", "\u00C5",
  "\u0340\u0341", "a\u0345\u0334\u0301\u0316", "\u0B47\u0B3E", "\u0DD9\u0DCF\u0DCA", "\u{11935}\u{11930}",
  "a\u07FD\u0301", "a\u0301\u07FD", "a\u{1E130}\u0316", "\u0915\u093C", "\u0929", "\u{16D67}\u{16D67}",
  "x\u{31350}y", "x\u{2EBF0}y", "x\u{16D43}y 1\u{16D70}2", "x\u{1E4D0}\u{1E4F0}", "x\u{323B0}y",
  "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>", "<tool_call>", "</tool_call>",
  "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n", "<think>\n\n</think>\n\n",
  "<|im_start|>system\nYou are helpful.<|im_end|>\n", "<|im_st", "|im_end|>", "<|im_start", "im_start|>",
  "<|im_start|<|im_end|>", "<<|im_end|>>", "<|im_start|><|im_start|>", "a<think>b</think>c", "<thinkk>",
  "<tool_response>{}</tool_response>", "<|fim_prefix|>x<|fim_suffix|>y<|fim_middle|>", "<|vision_start|><|image_pad|><|vision_end|>",
  "<|object_ref_start|>car<|object_ref_end|><|box_start|>(1,2)<|box_end|>", "<|quad_start|><|quad_end|><|video_pad|><|vision_pad|>",
  "<|repo_name|>r<|file_sep|>f<|fim_pad|>", " <|im_end|> ", "\n<|im_end|>\n", "<|endoftext|><|endoftext|>",
  "\u0000", "a\u0000b", "\u0001\u0002\u0003", "\u001b[31mred\u001b[0m", "\u007f", "\u0085", "x\u0085y", "\u200b", "a\u200bb", "\u200d",
  "\ufeffBOM", "\u00a0", "a\u00a0b", "a\u00a0\u00a0b", "\u3000", "全角\u3000スペース", "a\u2028b", "a\u2029b", "a\u202fb", "a\u205fb",
  "a\u1680b", "a\u2000\u2001\u2002b", "a\u200ab", " \u00a0x", "\u00a0 x", "x\u000b\u000cy", "\u000b\n", " \r", "\r", "\r\r\n\n",
  "\uFFFD", "\uFFFF", "\u{10FFFF}", "\u{E0001}", "\u{F0000}", "\uE000", "\u{1D11E}", "\u{1F9D1}",
  "ﬁ ﬂ ﬆ", "Ⅳ", "㍿", "ℌ", "ǅ", "ß ẞ", "İstanbul", "ı", "ﷺ", "ᾼ", "ΐ",
];

function buildPools() {
  const letters = [..."abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZéüñçøåßæœ"];
  const words = ["the", "The", "and", "of", "to", "in", "is", "was", "for", "on", "with", "as", "hello", "world",
    "tokenizer", "function", "return", "HTTP", "iPhone", "McDonald", "naïve", "façade", "über", "straße", "xyzzy"];
  return {
    words, letters,
    cjk: [..."的一是不了人我在有他这中大来上国个到说们为子和你地出道也时年得就那要下以生会自着去之过家学对可她里后小么心多天而能好都然没日于起还发成事只作当想看文无开手十用主行方又如前所本见经头面公同三已老从动两长知民样现分将外但身些与高意进把法此实回二理美点月明其种声全工己话儿者向情部正名定女问力机给等几很业最间新什打便位因重被走电四第门相次东政海口使教西再平真听世气信北少关并内加化由却代军产入先山五太水万市眼体别处总才场师书比住员九笑性通目华报立马命张活难神数件安表原车白应路期叫死常提感金何更反合放做系计或司利受光王果亲界及今京务制解各任至清物台象记边共风战干接它许八特觉望直服毛林题建南度统色字请交爱让认算论百吃义科怎元社术结六功指思非流每青管夫连远资队跟带花快条院变联言权往展该领传近留红治决周保达办运武半候七必城父强步完革深区"],
    kana: [..."あいうえおかきくけこさしすせそたちつてとなにぬねのはひふへほまみむめもやゆよらりるれろわをんアイウエオカキクケコサシスセソタチツテト"],
    hangul: [..."가나다라마바사아자차카타파하한국어입니다를은는이가"],
    cyrillic: [..."абвгдеёжзийклмнопрстуфхцчшщъыьэюяАБВГДЕЖЗИЙКЛМНОПРСТУФХЦЧШЩЪЫЬЭЮЯ"],
    arabic: [..."ابتثجحخدذرزسشصضطظعغفقكلمنهوي"].concat(["\u064B", "\u064E", "\u0651", "\u0670"]),
    devanagari: [..."अआइईउऊएऐओऔकखगघचछजझटठडढणतथदधनपफबभमयरलवशषसह"].concat(["\u093E", "\u093F", "\u0940", "\u094D", "\u0902", "\u093C"]),
    thai: [..."กขคงจฉชซญดตถทธนบปผพฟภมยรลวศษสหอฮ"].concat(["\u0E31", "\u0E34", "\u0E35", "\u0E48", "\u0E49", "\u0E4C"]),
    greek: [..."αβγδεζηθικλμνξοπρστυφχψωΑΒΓΔΕΖΗΘ"],
    digits: [..."0123456789"].concat(["\u0660", "\u0967", "\u0E51", "\uFF11", "\u2460", "\u00BD", "\u2163", "\u{1D7D8}"]),
    punct: [..."!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"].concat(["…", "—", "“", "”", "«", "»", "。", "，", "、", "！", "¿", "¡", "§", "©", "®", "°", "€", "£", "¥", "→", "∑", "√", "∞", "≠"]),
    space: [" ", " ", " ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", "\r", "\u000b", "\u000c", "\u0085", "\u00a0", "\u1680", "\u2000", "\u2003", "\u2009", "\u200a", "\u2028", "\u2029", "\u202f", "\u205f", "\u3000", " \n", "\n ", "\t\n", " \t "],
    marks: ["\u0300", "\u0301", "\u0302", "\u0303", "\u0308", "\u030A", "\u0316", "\u0323", "\u0327", "\u0328", "\u0334", "\u0345", "\u05B0", "\u0654", "\u0F72", "\u07FD", "\u0898", "\u1AC1", "\u1DF6", "\u{1E130}", "\u{10EFD}", "\u0C3C", "\u3099", "\u309A"],
    decomposable: ["é", "Å", "\u212B", "\u2126", "\uF900", "\uF91D", "\uFA10", "\u{2F800}", "\u{2F8A6}", "\u0958", "\u1E9B", "\u1F82", "\u0344", "\u0340", "\u0374", "\u037E", "\u0387", "\u1FEE", "\u2ADC", "\uAC01", "\uD7A3", "\u304C", "\u30D0", "\u{1109A}", "\u{1D15E}"],
    jamo: range(0x1100, 0x1112).concat(range(0x1161, 0x1175), range(0x11A8, 0x11C2)),
    emoji: ["😀", "😂", "🙏", "👍", "👍🏻", "👍🏿", "👨‍💻", "👩‍❤️‍👨", "👨‍👩‍👧", "🏳️‍🌈", "🇩🇪", "✨", "🔥", "❤️", "☕", "\u200d", "\ufe0f", "🏽", "🧑‍🚀", "🐈‍⬛"],
    special: ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>", "<tool_call>", "</tool_call>", "<|fim_middle|>", "<tool_response>", "<|im_st", "|im_end|>", "<|", "|>", "<think", "think>", "</", "<|im_start|", "<|endoftext"],
    contraction: ["'s", "'S", "'t", "'T", "'re", "'RE", "'rE", "'Re", "'ve", "'VE", "'vE", "'m", "'M", "'ll", "'LL", "'Ll", "'lL", "'d", "'D", "'ſ", "'", "''", " '"],
    control: ["\u0000", "\u0001", "\u0007", "\u0008", "\u001b", "\u001f", "\u007f", "\u0080", "\u009f", "\u200b", "\u200e", "\u2060", "\ufeff", "\u00ad"],
    newer: ["\u{31350}", "\u{2EBF0}", "\u{16D43}", "\u{16D70}", "\u{1E4D0}", "\u{1E4F0}", "\u{105C0}", "\u{10D40}", "\u{1CCF0}", "\u{11F04}", "\u{323B0}", "\u{10940}", "\u1C89", "\uA7CB", "\u{1E030}"],
  };
}

// Random strings from fragments of every kind, weighted towards the hazards.
function randomMix(rand, pools) {
  const kinds = Object.keys(pools).filter((k) => Array.isArray(pools[k]));
  const pick = (xs) => xs[Math.floor(rand() * xs.length)];
  const n = 1 + Math.floor(rand() * 24);
  let s = "";
  for (let i = 0; i < n; i++) {
    const kind = pick(kinds);
    const reps = rand() < 0.2 ? 1 + Math.floor(rand() * 6) : 1;
    for (let r = 0; r < reps; r++) s += pick(pools[kind]);
  }
  return s;
}

// Random Unicode scalar values from anywhere (no surrogates), to catch character-class differences.
function randomCodePoints(rand) {
  const n = 1 + Math.floor(rand() * 16);
  let s = "";
  for (let i = 0; i < n; i++) {
    let c;
    const r = rand();
    if (r < 0.3) c = Math.floor(rand() * 0x80);
    else if (r < 0.6) c = Math.floor(rand() * 0x3000);
    else if (r < 0.85) c = Math.floor(rand() * 0x10000);
    else c = Math.floor(rand() * 0x110000);
    if (c >= 0xd800 && c <= 0xdfff) c = 0x20;
    s += cp(c);
  }
  return s;
}

function shakespeareSlices(rand, count, textPath) {
  const text = fs.readFileSync(textPath, "utf8");
  const out = [];
  for (let i = 0; i < count; i++) {
    const start = Math.floor(rand() * (text.length - 600));
    out.push(text.slice(start, start + 1 + Math.floor(rand() * 500)));
  }
  return out;
}

function longCases() {
  return [
    "a".repeat(5000), "ab".repeat(2000), " ".repeat(3000) + "x", "\n".repeat(1000), "9".repeat(2000),
    "😀".repeat(500), "e\u0301".repeat(800), "\u0301".repeat(300), "a" + "\u0316\u0301".repeat(200),
    "Lorem ipsum dolor sit amet, ".repeat(100), "\u1100\u1161\u11A8".repeat(300), "!?".repeat(1000),
  ];
}

async function encodeAll(tokenizer, strings) {
  const out = [];
  for (const text of strings) {
    const enc = await tokenizer.encode(text, null, { addSpecialTokens: false });
    out.push({ text, ids: Array.from(enc.getIds()) });
  }
  return out;
}

function writeCases(file, cases) {
  const lines = cases.map((c) => JSON.stringify(c));
  fs.writeFileSync(file, "[\n" + lines.join(",\n") + "\n]\n");
}

async function main() {
  const args = process.argv.slice(2);
  const pools = buildPools();
  if (args[0] === "--fuzz" && args.length === 5) {
    const [seed, count, tokenizerPath, out] = args.slice(1);
    const rand = mulberry32(Number(seed));
    const strings = [];
    for (let i = 0; i < Number(count); i++) strings.push(i % 3 === 2 ? randomCodePoints(rand) : randomMix(rand, pools));
    writeCases(out, await encodeAll(Tokenizer.fromFile(tokenizerPath), strings));
    return;
  }
  if (args.length !== 3 || args[0].startsWith("-")) {
    console.error("usage: node tests/gen_tokenizer_goldens.js TOKENIZER_JSON TEXT_FILE OUT.json\n" +
                  "       node tests/gen_tokenizer_goldens.js --fuzz SEED COUNT TOKENIZER_JSON OUT.json");
    process.exit(2);
  }
  const [tokenizerPath, textPath, out] = args;
  const rand = mulberry32(20251121);
  const strings = [...FIXED];
  for (const w of pools.words) strings.push(w, " " + w, w.toUpperCase() + "'S");
  for (let i = 0; i < 700; i++) strings.push(randomMix(rand, pools));
  for (let i = 0; i < 150; i++) strings.push(randomCodePoints(rand));
  strings.push(...shakespeareSlices(rand, 250, textPath), ...longCases());
  const cases = await encodeAll(Tokenizer.fromFile(tokenizerPath), strings);
  writeCases(out, cases);
  console.log(`wrote ${cases.length} cases to ${out}`);
}

main();
