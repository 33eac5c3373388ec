//! The device context: one CUDA context, a compute stream, a cuBLAS handle
//! and the NVRTC-compiled kernels.

use super::error::{CudaError, CudaLibrary};
use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaStream};
use std::collections::HashMap;
use std::sync::Arc;

/// What [`GpuContext::probe`] found about a device.
#[derive(Clone, Debug)]
pub struct DeviceInfo {
    /// Device ordinal.
    pub ordinal: usize,
    /// Marketing name, e.g. "NVIDIA H200".
    pub name: String,
    /// Compute capability (major, minor).
    pub compute_capability: (i32, i32),
    /// Device memory in bytes.
    pub total_mem: usize,
    /// Devices visible to the driver.
    pub device_count: usize,
}

impl std::fmt::Display for DeviceInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (ma, mi) = self.compute_capability;
        write!(
            f,
            "device {} of {}: {} (sm_{ma}{mi}, {:.1} GiB)",
            self.ordinal,
            self.device_count,
            self.name,
            self.total_mem as f64 / (1u64 << 30) as f64
        )
    }
}

/// Checks that `lib` can be loaded, before cudarc's lazy loader (which
/// panics on a missing library) is touched.
pub(crate) fn require(lib: CudaLibrary) -> Result<(), CudaError> {
    // SAFETY: each function only tries to dlopen the library's candidate
    // names and drops the handle; it runs no code of the library beyond its
    // initialisers, which is what any later use would run as well.
    let present = unsafe {
        match lib {
            CudaLibrary::Driver => cudarc::driver::sys::is_culib_present(),
            CudaLibrary::Nvrtc => cudarc::nvrtc::sys::is_culib_present(),
            CudaLibrary::Cublas => cudarc::cublas::sys::is_culib_present(),
        }
    };
    if present {
        Ok(())
    } else {
        Err(CudaError::MissingLibrary(lib))
    }
}

/// Opens the driver's context on device `ordinal` (the driver must be present).
fn open_context(ordinal: usize) -> Result<Arc<CudaContext>, CudaError> {
    require(CudaLibrary::Driver)?;
    // with the library present, a machine without a device gets Err(CUDA_ERROR_NO_DEVICE)
    let count = CudaContext::device_count()?;
    if count <= 0 {
        return Err(CudaError::Driver(cudarc::driver::DriverError(
            cudarc::driver::sys::cudaError_enum::CUDA_ERROR_NO_DEVICE,
        )));
    }
    Ok(CudaContext::new(ordinal)?)
}

/// One GPU, ready to run the kernels: context, compute stream, cuBLAS
/// handle bound to that stream, and the compiled kernel functions.
///
/// Everything launched through one `GpuContext` goes to its compute stream
/// in order; the expert pool adds a copy stream of its own.
pub struct GpuContext {
    info: DeviceInfo,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    _module: Arc<CudaModule>,
    funcs: HashMap<&'static str, CudaFunction>,
    /// What the kernels were loaded as (machine code or PTX).
    image: String,
}

impl GpuContext {
    /// Reports on device `ordinal` without compiling anything: the clear
    /// error when there is no driver or no device, otherwise its name and size.
    pub fn probe(ordinal: usize) -> Result<DeviceInfo, CudaError> {
        let ctx = open_context(ordinal)?;
        info(&ctx)
    }

    /// Opens device `ordinal`, compiles the kernels with NVRTC and creates
    /// the cuBLAS handle. Fails with a clear error (never a panic) when the
    /// driver, a device, NVRTC or cuBLAS is missing.
    pub fn new(ordinal: usize) -> Result<Self, CudaError> {
        let ctx = open_context(ordinal)?;
        let info = info(&ctx)?;
        require(CudaLibrary::Nvrtc)?;
        require(CudaLibrary::Cublas)?;
        let stream = ctx.new_stream()?;
        let (module, funcs, image) = compile(&ctx, info.compute_capability)?;
        let blas = CudaBlas::new(stream.clone())?;
        Ok(Self { info, ctx, stream, blas, _module: module, funcs, image })
    }

    /// The device this context runs on.
    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    /// What the kernels were loaded as: machine code for the device, or
    /// PTX compiled by the driver (with why the machine code was not used).
    pub fn kernel_image(&self) -> &str {
        &self.image
    }

    /// The driver context.
    pub fn cuda(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The compute stream every kernel and product is launched on.
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// The cuBLAS handle (bound to [`Self::stream`]).
    pub(crate) fn blas(&self) -> &CudaBlas {
        &self.blas
    }

    /// A compiled kernel by name (one of `KERNEL_NAMES`).
    pub(crate) fn func(&self, name: &'static str) -> &CudaFunction {
        // every name in KERNEL_NAMES was loaded in `new`, and only those are asked for
        &self.funcs[name]
    }

    /// Waits for everything queued on the compute stream.
    pub fn synchronize(&self) -> Result<(), CudaError> {
        Ok(self.stream.synchronize()?)
    }
}

fn info(ctx: &Arc<CudaContext>) -> Result<DeviceInfo, CudaError> {
    Ok(DeviceInfo {
        ordinal: ctx.ordinal(),
        name: ctx.name()?,
        compute_capability: ctx.compute_capability()?,
        total_mem: ctx.total_mem()?,
        device_count: CudaContext::device_count()?.max(0) as usize,
    })
}

/// Compiles `KERNELS_SRC` to PTX for compute capability `major.minor` with
/// NVRTC (needs only `libnvrtc`, no GPU and no driver).
pub fn compile_ptx((major, minor): (i32, i32)) -> Result<cudarc::nvrtc::Ptx, CudaError> {
    require(CudaLibrary::Nvrtc)?;
    let opts = cudarc::nvrtc::CompileOptions {
        // PTX for this device's virtual architecture; the driver JIT-compiles it
        options: vec![format!("--gpu-architecture=compute_{major}{minor}"), "--std=c++14".into()],
        name: Some("moe_kernels.cu".into()),
        ..Default::default()
    };
    cudarc::nvrtc::compile_ptx_with_opts(super::KERNELS_SRC, opts).map_err(|e| CudaError::Compile(e.to_string()))
}

/// Compiles `KERNELS_SRC` to machine code (a CUBIN) for compute capability
/// `major.minor` with NVRTC (no GPU needed). Preferred to PTX: a driver
/// JIT-compiles only PTX no newer than its own CUDA version, while a CUBIN of
/// the same major version loads whatever NVRTC minor version built it.
pub fn compile_cubin((major, minor): (i32, i32)) -> Result<Vec<u8>, CudaError> {
    use cudarc::nvrtc::{result, sys};
    require(CudaLibrary::Nvrtc)?;
    let src = std::ffi::CString::new(super::KERNELS_SRC).map_err(|e| CudaError::Compile(e.to_string()))?;
    let name = c"moe_kernels.cu";
    let prog = result::create_program(&src, Some(name)).map_err(|e| CudaError::Compile(e.to_string()))?;
    let opts = [format!("--gpu-architecture=sm_{major}{minor}"), "--std=c++14".to_string()];
    // SAFETY: `prog` was just created from a live source string and is
    // destroyed exactly once below; the size and buffer calls follow
    // NVRTC's contract (the buffer holds the size it reported).
    unsafe {
        let out = (|| {
            if let Err(e) = result::compile_program(prog, &opts) {
                let log = result::get_program_log(prog)
                    .map(|l| std::ffi::CStr::from_ptr(l.as_ptr()).to_string_lossy().into_owned())
                    .unwrap_or_default();
                return Err(CudaError::Compile(format!("{e:?}: {log}")));
            }
            let mut size = 0usize;
            sys::nvrtcGetCUBINSize(prog, &mut size).result().map_err(|e| CudaError::Compile(format!("{e:?}")))?;
            let mut buf = vec![0u8; size];
            sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr() as *mut _)
                .result()
                .map_err(|e| CudaError::Compile(format!("{e:?}")))?;
            Ok(buf)
        })();
        let _ = result::destroy_program(prog);
        out
    }
}

/// [`compile_cubin`], once per architecture per process (a process that
/// opens several contexts, like the GPU check, compiles once).
fn cached_cubin(cc: (i32, i32)) -> Result<Vec<u8>, CudaError> {
    type Cache = std::sync::Mutex<HashMap<(i32, i32), Vec<u8>>>;
    static CACHE: std::sync::OnceLock<Cache> = std::sync::OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    if let Some(bin) = cache.lock().unwrap_or_else(|p| p.into_inner()).get(&cc) {
        return Ok(bin.clone());
    }
    let bin = compile_cubin(cc)?;
    cache.lock().unwrap_or_else(|p| p.into_inner()).insert(cc, bin.clone());
    Ok(bin)
}

/// Compiles `KERNELS_SRC` for the device and loads every kernel: machine
/// code for its architecture, or PTX for the driver to compile where that
/// cannot be built or loaded. Returns which it loaded.
#[allow(clippy::type_complexity)]
fn compile(
    ctx: &Arc<CudaContext>,
    cc: (i32, i32),
) -> Result<(Arc<CudaModule>, HashMap<&'static str, CudaFunction>, String), CudaError> {
    let (ma, mi) = cc;
    let (module, image) =
        match cached_cubin(cc).and_then(|bin| Ok(ctx.load_module(cudarc::nvrtc::Ptx::from_binary(bin))?)) {
            Ok(m) => (m, format!("sm_{ma}{mi} machine code")),
            Err(cubin) => {
                let m = ctx.load_module(compile_ptx(cc)?).map_err(|e| {
                    CudaError::Compile(format!("machine code: {cubin}; PTX: {e} (is NVRTC newer than the driver?)"))
                })?;
                (m, format!("compute_{ma}{mi} PTX (machine code failed: {cubin})"))
            }
        };
    let mut funcs = HashMap::new();
    for &name in super::KERNEL_NAMES {
        funcs.insert(name, module.load_function(name)?);
    }
    Ok((module, funcs, image))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// NVRTC needs no GPU: wherever libnvrtc loads, the kernel source must
    /// compile and define every kernel the context loads. (On a machine with
    /// only a CUDA 13 NVRTC, `libnvrtc.so.13`, a `libnvrtc.so` symlink to it on
    /// LD_LIBRARY_PATH lets cudarc find it; `scripts/gpu-check.sh` does that.)
    /// CI installs NVRTC from PyPI and sets `MOE_REQUIRE_NVRTC=1`, so there a
    /// missing library fails instead of skipping.
    #[test]
    fn nvrtc_compiles_every_kernel() {
        for cc in [(8, 0), (9, 0)] {
            let ptx = match compile_ptx(cc) {
                Ok(p) => p.to_src(),
                Err(CudaError::MissingLibrary(lib)) => {
                    assert!(std::env::var_os("MOE_REQUIRE_NVRTC").is_none(), "MOE_REQUIRE_NVRTC is set but {lib}");
                    moe_types::testing::skip("cuda::nvrtc_compiles_every_kernel", &lib.to_string());
                    return;
                }
                Err(e) => panic!("{e}"),
            };
            for name in super::super::KERNEL_NAMES {
                assert!(ptx.contains(&format!(".entry {name}(")), "sm_{}{}: no kernel {name} in the PTX", cc.0, cc.1);
            }
            let bin = compile_cubin(cc).unwrap_or_else(|e| panic!("sm_{}{}: {e}", cc.0, cc.1));
            for name in super::super::KERNEL_NAMES {
                assert!(
                    bin.windows(name.len()).any(|w| w == name.as_bytes()),
                    "sm_{}{}: no {name} in the machine code",
                    cc.0,
                    cc.1
                );
            }
            assert!(bin.starts_with(b"\x7fELF"), "sm_{}{}: the machine code is not an ELF image", cc.0, cc.1);
            eprintln!("sm_{}{}: {} bytes of machine code", cc.0, cc.1, bin.len());
            eprintln!(
                "compute_{}{}: {} kernels, {} bytes of PTX",
                cc.0,
                cc.1,
                super::super::KERNEL_NAMES.len(),
                ptx.len()
            );
        }
    }

    /// On a machine without a driver the error says so (and nothing panics);
    /// with a driver and a device, probing succeeds.
    #[test]
    fn missing_driver_is_an_error_not_a_panic() {
        match GpuContext::probe(0) {
            Ok(info) => eprintln!("GPU present: {info}"),
            Err(e) => {
                let msg = e.to_string();
                eprintln!("no GPU here: {msg}");
                // SAFETY: only probes whether libcuda can be loaded.
                if !unsafe { cudarc::driver::sys::is_culib_present() } {
                    assert!(msg.contains("no CUDA driver"), "{msg}");
                }
            }
        }
    }
}
