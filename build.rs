//! Builds everything the CUDA backend needs from `kernels/`, in three steps:
//!
//! 1. The kernel list, once: every `kernels/*.cu` is a module, and every `extern "C" __global__`
//!    function in it a kernel. `$OUT_DIR/kernels.rs` (included by src/backend/cuda/kernels.rs)
//!    gets the modules, the kernels, a constant per kernel, the embedded PTX, and the launch
//!    constants of `kernels/tiles.cuh`. Nothing else lists them by hand.
//! 2. PTX for a real GPU: nvcc compiles each module for `compute_80` (one build JIT-loads on A100-
//!    and H100-class GPUs). nvcc is looked up as env `NVCC`, `CUDA_HOME/bin/nvcc`,
//!    `CUDA_PATH/bin/nvcc`, then `PATH`. Without it the build still succeeds and the real-GPU
//!    backend reports "kernels not compiled"; `VQX_REQUIRE_NVCC=1` makes that an error.
//! 3. The emulated device (`cuda-emu`): the same unmodified .cu files compiled by the host C++
//!    compiler with `emu/device.h` (CUDA's constructs on the CPU) into a static library with
//!    emu/runtime.cpp. Always built: it is how CI executes every kernel without a GPU.
//!    `VQX_EMU_SANITIZE=address|undefined|address,undefined|thread` builds it with sanitizers
//!    (scripts/sanitize.sh).

use std::collections::BTreeMap;
use std::env;
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The virtual architecture the PTX targets.
const ARCH: &str = "compute_80";

/// One kernels/*.cu file.
struct Module {
    name: String,
    path: PathBuf,
    kernels: Vec<String>,
    /// The `extern __shared__` array of the module: (element type, name).
    dyn_shared: Option<(String, String)>,
}

fn main() {
    println!("cargo:rustc-check-cfg=cfg(vqx_kernels)");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=kernels");
    println!("cargo:rerun-if-changed=emu");
    for var in [
        "NVCC",
        "CUDA_HOME",
        "CUDA_PATH",
        "PATH",
        "VQX_REQUIRE_NVCC",
        "VQX_EMU_SANITIZE",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let modules = scan_modules(Path::new("kernels"));
    for m in &modules {
        println!("cargo:rerun-if-changed={}", m.path.display());
    }
    let tiles = parse_tiles(Path::new("kernels/tiles.cuh"));

    let ptx_compiled = compile_ptx(&modules, &out_dir);
    write_rust_list(&modules, &tiles, ptx_compiled, &out_dir);
    build_emulator(&modules, &out_dir);
}

/// The modules in kernels/, sorted by name, with their kernels in source order.
fn scan_modules(dir: &Path) -> Vec<Module> {
    let mut paths: Vec<PathBuf> = fs::read_dir(dir)
        .expect("kernels/ is readable")
        .map(|e| e.expect("kernels/ entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    paths.sort();
    paths
        .into_iter()
        .map(|path| {
            let src = fs::read_to_string(&path).expect("kernel source is readable");
            let code = strip_comments(&src);
            let name = path.file_stem().unwrap().to_string_lossy().into_owned();
            let kernels = kernel_names(&code);
            assert!(
                !kernels.is_empty(),
                "{}: no extern \"C\" __global__ kernel",
                path.display()
            );
            let dyn_shared = dyn_shared_array(&code, &path);
            Module {
                name,
                path,
                kernels,
                dyn_shared,
            }
        })
        .collect()
}

/// Source text with `//` and `/* */` comments blanked out (string literals are not expected).
fn strip_comments(src: &str) -> String {
    let mut out = String::with_capacity(src.len());
    let mut rest = src;
    while !rest.is_empty() {
        if let Some(r) = rest.strip_prefix("//") {
            let end = r.find('\n').unwrap_or(r.len());
            rest = &r[end..];
        } else if let Some(r) = rest.strip_prefix("/*") {
            let end = r.find("*/").map_or(r.len(), |e| e + 2);
            rest = &r[end..];
            out.push(' ');
        } else {
            let c = rest.chars().next().unwrap();
            out.push(c);
            rest = &rest[c.len_utf8()..];
        }
    }
    out
}

/// Names of the `extern "C" __global__ void [__launch_bounds__(...)] NAME(` functions.
fn kernel_names(code: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = code;
    while let Some(i) = rest.find("extern \"C\"") {
        rest = &rest[i + "extern \"C\"".len()..];
        let Some(r) = rest.trim_start().strip_prefix("__global__") else {
            continue;
        };
        let r = r
            .trim_start()
            .strip_prefix("void")
            .expect("kernels return void");
        let mut r = r.trim_start();
        if let Some(lb) = r.strip_prefix("__launch_bounds__") {
            let close = lb.find(')').expect("__launch_bounds__(...) is closed");
            r = lb[close + 1..].trim_start();
        }
        let end = r
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(r.len());
        names.push(r[..end].to_string());
        rest = &r[end..];
    }
    names
}

/// The module's `extern __shared__ TYPE NAME[];`, at most one per module.
fn dyn_shared_array(code: &str, path: &Path) -> Option<(String, String)> {
    let mut found = None;
    for stmt in code.split(';') {
        let s = stmt.split_whitespace().collect::<Vec<_>>().join(" ");
        let Some(i) = s.find("extern __shared__ ") else {
            continue;
        };
        let decl = s[i + "extern __shared__ ".len()..].trim();
        let decl = decl
            .strip_suffix("[]")
            .unwrap_or_else(|| panic!("{}: extern __shared__ must be TYPE NAME[]", path.display()));
        let split = decl.rfind(' ').expect("extern __shared__ TYPE NAME[]");
        let (ty, name) = (decl[..split].trim(), decl[split + 1..].trim());
        let ty = ty.trim_start_matches("__align__(16)").trim();
        let prev = found.replace((ty.to_string(), name.to_string()));
        assert!(
            prev.is_none() || prev.as_ref().map(|p| &p.1) == Some(&name.to_string()),
            "{}: the emulator supports one extern __shared__ array per module",
            path.display()
        );
    }
    found
}

/// `#define NAME VALUE  // doc` lines of kernels/tiles.cuh, in order.
fn parse_tiles(path: &Path) -> Vec<(String, u64, String)> {
    let src = fs::read_to_string(path).expect("kernels/tiles.cuh is readable");
    src.lines()
        .filter_map(|line| {
            let rest = line.trim().strip_prefix("#define ")?;
            let mut parts = rest.splitn(3, char::is_whitespace);
            let name = parts.next()?.to_string();
            let tail = parts.collect::<Vec<_>>().join(" ");
            let tail = tail.trim();
            let (value, doc) = match tail.find("//") {
                Some(i) => (tail[..i].trim(), tail[i + 2..].trim()),
                None => (tail, ""),
            };
            let value: u64 = value
                .parse()
                .unwrap_or_else(|_| panic!("{}: {name} is not an integer", path.display()));
            Some((name, value, doc.to_string()))
        })
        .collect()
}

/// nvcc → `$OUT_DIR/{module}.ptx`; true when every module compiled.
fn compile_ptx(modules: &[Module], out_dir: &Path) -> bool {
    let require = env::var("VQX_REQUIRE_NVCC").is_ok_and(|v| !v.is_empty() && v != "0");
    let Some(nvcc) = find_nvcc() else {
        let msg = "nvcc not found (set NVCC or CUDA_HOME): CUDA kernels not compiled for a GPU, \
                   the cuda backend will report itself unavailable (cuda-emu still works)";
        if require {
            panic!("VQX_REQUIRE_NVCC is set but {msg}");
        }
        println!("cargo:warning={msg}");
        println!(
            "cargo:rustc-env=VQX_KERNELS_STATUS=kernels not compiled: nvcc not found (set NVCC or CUDA_HOME)"
        );
        return false;
    };
    let mut failures = Vec::new();
    for m in modules {
        let dst = out_dir.join(format!("{}.ptx", m.name));
        let result = Command::new(&nvcc)
            .arg(format!("-arch={ARCH}"))
            .args(["-ptx", "-O3", "-std=c++17", "-lineinfo", "-o"])
            .arg(&dst)
            .arg(&m.path)
            .output();
        match result {
            Ok(out) if out.status.success() => {}
            Ok(out) => failures.push(format!(
                "{} -arch={ARCH} -ptx {} failed ({}):\n{}{}",
                nvcc.display(),
                m.path.display(),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )),
            Err(e) => failures.push(format!("could not run {}: {e}", nvcc.display())),
        }
    }
    if failures.is_empty() {
        println!("cargo:rustc-cfg=vqx_kernels");
        println!(
            "cargo:rustc-env=VQX_KERNELS_STATUS=kernels compiled to {ARCH} PTX by {}",
            nvcc.display()
        );
        return true;
    }
    if require {
        panic!(
            "VQX_REQUIRE_NVCC is set and kernel compilation failed:\n{}",
            failures.join("\n")
        );
    }
    for f in &failures {
        for line in f.lines() {
            println!("cargo:warning={line}");
        }
    }
    println!("cargo:warning=CUDA kernels not compiled: the cuda backend will be unavailable");
    println!(
        "cargo:rustc-env=VQX_KERNELS_STATUS=kernels not compiled: nvcc {} failed (see the build warnings)",
        nvcc.display()
    );
    false
}

/// `$OUT_DIR/kernels.rs`: modules, kernels, PTX and the tile constants.
fn write_rust_list(modules: &[Module], tiles: &[(String, u64, String)], ptx: bool, out_dir: &Path) {
    let mut s = String::from("// @generated by build.rs from kernels/*.cu and kernels/tiles.cuh\n");
    let names: Vec<String> = modules.iter().map(|m| format!("{:?}", m.name)).collect();
    let kernels: Vec<(usize, &String)> = modules
        .iter()
        .enumerate()
        .flat_map(|(i, m)| m.kernels.iter().map(move |k| (i, k)))
        .collect();
    let mut seen = BTreeMap::new();
    for (i, k) in &kernels {
        if let Some(prev) = seen.insert(k.as_str(), *i) {
            panic!(
                "kernel {k} is defined in both {} and {}",
                modules[prev].name, modules[*i].name
            );
        }
    }
    writeln!(
        s,
        "/// Kernel modules, one per kernels/*.cu, by file name.\npub const MODULES: [&str; {}] = [{}];",
        modules.len(),
        names.join(", ")
    )
    .unwrap();
    writeln!(
        s,
        "/// Every kernel: its name and the index of its module in [`MODULES`].\npub const KERNELS: [(&str, usize); {}] = [{}];",
        kernels.len(),
        kernels
            .iter()
            .map(|(i, k)| format!("({k:?}, {i})"))
            .collect::<Vec<_>>()
            .join(", ")
    )
    .unwrap();
    for (id, (i, k)) in kernels.iter().enumerate() {
        writeln!(
            s,
            "/// `{k}` in kernels/{}.cu.\npub const {}: KernelId = KernelId({id});",
            modules[*i].name,
            k.to_ascii_uppercase()
        )
        .unwrap();
    }
    if ptx {
        let srcs: Vec<String> = modules
            .iter()
            .map(|m| {
                format!(
                    "include_str!(concat!(env!(\"OUT_DIR\"), \"/{}.ptx\"))",
                    m.name
                )
            })
            .collect();
        writeln!(
            s,
            "/// The PTX of each module, in [`MODULES`] order.\npub const PTX: Option<[&str; {}]> = Some([{}]);",
            modules.len(),
            srcs.join(", ")
        )
        .unwrap();
    } else {
        writeln!(
            s,
            "/// The PTX of each module: not compiled into this build.\npub const PTX: Option<[&str; {}]> = None;",
            modules.len()
        )
        .unwrap();
    }
    writeln!(
        s,
        "/// The virtual architecture of the PTX.\npub const PTX_ARCH: &str = {ARCH:?};"
    )
    .unwrap();
    s.push_str("/// The launch constants of kernels/tiles.cuh.\npub mod tiles {\n");
    for (name, value, doc) in tiles {
        writeln!(s, "    /// {doc}\n    pub const {name}: usize = {value};").unwrap();
    }
    s.push_str("}\n");
    fs::write(out_dir.join("kernels.rs"), s).expect("write kernels.rs");
}

/// The emulated device: one wrapper per module, the registry, the runtime.
fn build_emulator(modules: &[Module], out_dir: &Path) {
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let gen_dir = out_dir.join("emu");
    fs::create_dir_all(&gen_dir).expect("create OUT_DIR/emu");
    let mut files = Vec::new();
    // emu/faults.cu: the emulator's own test kernels, in its registry but never a GPU module.
    let faults = Module {
        name: "emu_faults".into(),
        path: PathBuf::from("emu/faults.cu"),
        kernels: kernel_names(&strip_comments(
            &fs::read_to_string("emu/faults.cu").expect("emu/faults.cu is readable"),
        )),
        dyn_shared: None,
    };
    let modules: Vec<&Module> = modules.iter().chain(std::iter::once(&faults)).collect();
    for m in &modules {
        let mut w = format!(
            "// @generated by build.rs: {} for the emulated device.\n#include \"device.h\"\n",
            m.path.display()
        );
        let dyn_fn = if let Some((ty, name)) = &m.dyn_shared {
            // The kernel's block-scope `extern __shared__` refers to this definition.
            writeln!(
                w,
                "static thread_local __attribute__((aligned(16))) {ty} {name}[VQX_EMU_DYN_SHARED_CAPACITY / sizeof({ty})];\nstatic void* vqx_emu_dyn_shared() {{ return {name}; }}"
            )
            .unwrap();
            "&vqx_emu_dyn_shared"
        } else {
            "nullptr"
        };
        writeln!(w, "#include \"{}\"", root.join(&m.path).display()).unwrap();
        writeln!(
            w,
            "extern \"C\" const vqx_emu_kernel vqx_emu_module_{}[] = {{",
            m.name
        )
        .unwrap();
        for k in &m.kernels {
            writeln!(w, "    VQX_EMU_KERNEL({k}, \"{}\", {dyn_fn}),", m.name).unwrap();
        }
        w.push_str("};\n");
        let path = gen_dir.join(format!("{}.cpp", m.name));
        write_if_changed(&path, &w);
        files.push(path);
    }
    let mut reg = String::from(
        "// @generated by build.rs: every kernel of the emulated device.\n#include \"vqx_emu.h\"\n",
    );
    for m in &modules {
        writeln!(
            reg,
            "extern \"C\" const vqx_emu_kernel vqx_emu_module_{}[{}];",
            m.name,
            m.kernels.len()
        )
        .unwrap();
    }
    let total: usize = modules.iter().map(|m| m.kernels.len()).sum();
    writeln!(reg, "static vqx_emu_kernel all[{total}];").unwrap();
    reg.push_str("extern \"C\" const vqx_emu_kernel* vqx_emu_kernels(size_t* count) {\n    static const bool filled = [] {\n        size_t i = 0;\n");
    for m in &modules {
        writeln!(
            reg,
            "        for (const auto& k : vqx_emu_module_{}) all[i++] = k;",
            m.name
        )
        .unwrap();
    }
    reg.push_str("        return i > 0;\n    }();\n    (void)filled;\n");
    writeln!(reg, "    *count = {total};\n    return all;\n}}").unwrap();
    let reg_path = gen_dir.join("registry.cpp");
    write_if_changed(&reg_path, &reg);

    let sanitize = env::var("VQX_EMU_SANITIZE").unwrap_or_default();
    let sanitize = sanitize.trim();
    let tsan = sanitize.split(',').any(|s| s == "thread");
    let asan = sanitize.split(',').any(|s| s == "address");

    let mut kernels = base_cc(&root);
    let mut runtime = base_cc(&root);
    if !sanitize.is_empty() {
        kernels.flag(format!("-fsanitize={sanitize}"));
        kernels.flag("-fno-omit-frame-pointer");
        if tsan {
            // The runtime's own bookkeeping between fibers is not a race; it drives TSan's fiber
            // API and annotates the barriers instead.
            runtime.define("VQX_EMU_TSAN", None);
        } else {
            runtime.flag(format!("-fsanitize={sanitize}"));
            if asan {
                runtime.define("VQX_EMU_ASAN", None);
            }
        }
        link_sanitizer_runtimes(&kernels, sanitize);
    }
    for f in &files {
        kernels.file(f);
    }
    kernels.file(&reg_path);
    kernels.compile("vqx_emu_kernels");
    runtime.file(root.join("emu/runtime.cpp"));
    runtime.compile("vqx_emu_runtime");
    println!(
        "cargo:rustc-env=VQX_EMU_SANITIZE={}",
        if sanitize.is_empty() {
            "none"
        } else {
            sanitize
        }
    );
}

/// Links the shared runtime of each sanitizer in `sanitize` (address → libasan, undefined →
/// libubsan, thread → libtsan). rustc links with `-nodefaultlibs`, which makes gcc's
/// `-fsanitize=` at link time add nothing, so the runtimes are named here, from the directory
/// the C++ compiler reports. A build script's native libraries precede std's on the link line,
/// so the runtime is the executables' first DT_NEEDED, ahead of libc, as ASan insists and as
/// TSan's interceptors need; scripts/sanitize.sh still preloads it (`LD_PRELOAD`) in case a
/// dependency ever links a library before it.
fn link_sanitizer_runtimes(build: &cc::Build, sanitize: &str) {
    let compiler = build.get_compiler();
    for kind in sanitize.split(',').map(str::trim) {
        let lib = match kind {
            "address" => "asan",
            "undefined" => "ubsan",
            "thread" => "tsan",
            other => {
                panic!("VQX_EMU_SANITIZE: unknown sanitizer {other:?} (address, undefined, thread)")
            }
        };
        let file = format!("lib{lib}.so");
        let out = Command::new(compiler.path())
            .arg(format!("-print-file-name={file}"))
            .output()
            .unwrap_or_else(|e| panic!("{} -print-file-name: {e}", compiler.path().display()));
        let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        // gcc answers the bare name when it has no such file.
        if let Some(dir) = path.parent().filter(|d| path.is_file() && d.is_dir()) {
            println!("cargo:rustc-link-search=native={}", dir.display());
        } else {
            println!(
                "cargo:warning=VQX_EMU_SANITIZE={sanitize}: {} has no {file}; relying on the linker's search path",
                compiler.path().display()
            );
        }
        println!("cargo:rustc-link-lib=dylib={lib}");
    }
}

/// The host compiler as the kernels need it.
fn base_cc(root: &Path) -> cc::Build {
    let mut b = cc::Build::new();
    b.cpp(true)
        .std("c++20")
        .include(root.join("emu"))
        .include(root.join("kernels"))
        // -O2 even in debug builds: the emulator runs every test's kernels.
        .opt_level(2)
        .debug(true)
        .warnings(false)
        // The kernels say where they fuse (fmaf); the host must not fuse a*b+c on its own.
        .flag("-ffp-contract=off")
        .flag("-fno-strict-aliasing")
        .flag("-Wno-unknown-pragmas");
    b
}

fn write_if_changed(path: &Path, text: &str) {
    if fs::read_to_string(path).is_ok_and(|t| t == text) {
        return;
    }
    fs::write(path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// NVCC, then CUDA_HOME/bin/nvcc, CUDA_PATH/bin/nvcc, then the PATH.
fn find_nvcc() -> Option<PathBuf> {
    if let Some(p) = env::var_os("NVCC").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        // An explicit NVCC that does not exist is reported, not silently replaced.
        if p.is_file() {
            return Some(p);
        }
        println!("cargo:warning=NVCC={} is not a file", p.display());
        return None;
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(home) = env::var_os(var).filter(|p| !p.is_empty()) {
            let p = Path::new(&home).join("bin").join(exe("nvcc"));
            if p.is_file() {
                return Some(p);
            }
        }
    }
    let path = env::var_os("PATH")?;
    env::split_paths(&path)
        .map(|dir| dir.join(exe("nvcc")))
        .find(|p| p.is_file())
}

fn exe(name: &str) -> String {
    format!("{name}{}", env::consts::EXE_SUFFIX)
}
