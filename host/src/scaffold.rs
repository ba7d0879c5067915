//! `pgstream-host new`: writes a ready-to-build handler project for one language.
//!
//! The project templates live in `templates/<language>/` at the root of the repository and are
//! compiled into the binary, so `new` works from an installed binary with no checkout around.
//! Every template file is copied with `{{name}}` (the project name, kebab-case) and
//! `{{name_snake}}` (the same with underscores, for identifiers and Rust artifact names)
//! replaced in its path and contents. The WIT package the host speaks is written to
//! `wit/handler.wit` of every project, so the project builds against exactly the contract of
//! the binary that created it. The handler and its helper module come from the repository's
//! example handlers rather than from copies in the templates, so a new project starts from
//! exactly the code the end-to-end tests run; Rust projects also get a copy of the guest SDK
//! (`pgstream-guest/`), which is not published on crates.io.

use std::fmt;
use std::path::{Path, PathBuf};

use include_dir::{Dir, DirEntry, include_dir};

/// Every language's project template, embedded at build time (`host/build.rs` makes cargo
/// rebuild when a template changes).
static TEMPLATES: Dir<'_> = include_dir!("$CARGO_MANIFEST_DIR/../templates");

/// The Rust example handler's lock file (its dependencies are the guest SDK's).
const EXAMPLE_CARGO_LOCK: &str = include_str!("../../examples/embed-handler/Cargo.lock");

/// The guest SDK's sources, copied into Rust projects.
static GUEST_SDK_SOURCES: Dir<'_> = include_dir!("$CARGO_MANIFEST_DIR/../guest-sdk/src");

/// The WIT package every handler is built against: the one this host was built with.
const HANDLER_WIT: &str = include_str!("../../wit/handler.wit");

/// Files a language's projects share with the repository's own example handler, embedded from
/// there so that the two cannot drift apart: (language, path in the project, contents). The
/// examples are what the end-to-end tests run.
const SHARED_FILES: &[(Language, &str, &str)] = &[
    (
        Language::Rust,
        "src/lib.rs",
        include_str!("../../examples/embed-handler/src/lib.rs"),
    ),
    (
        Language::Js,
        "handler.ts",
        include_str!("../../examples/js-handler/handler.ts"),
    ),
    (
        Language::C,
        "handler.c",
        include_str!("../../examples/c-handler/handler.c"),
    ),
    (
        Language::Python,
        "app.py",
        include_str!("../../examples/python-handler/app.py"),
    ),
    (
        Language::Python,
        "pgstream.py",
        include_str!("../../examples/python-handler/pgstream.py"),
    ),
    (
        Language::Js,
        "pgstream.ts",
        include_str!("../../examples/js-handler/pgstream.ts"),
    ),
    (
        Language::Js,
        "types/pgstream-handler.d.ts",
        include_str!("../../examples/js-handler/types/pgstream-handler.d.ts"),
    ),
    (
        Language::Js,
        "types/globals.d.ts",
        include_str!("../../examples/js-handler/types/globals.d.ts"),
    ),
    (
        Language::C,
        "pgstream.c",
        include_str!("../../examples/c-handler/pgstream.c"),
    ),
    (
        Language::C,
        "pgstream.h",
        include_str!("../../examples/c-handler/pgstream.h"),
    ),
    (
        Language::C,
        "strip-debug.py",
        include_str!("../../mk/wasm_strip_debug.py"),
    ),
];

/// A language `new` can write a project for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Language {
    /// Rust with the `pgstream-guest` SDK, built by cargo for `wasm32-wasip2`.
    Rust,
    /// Python, packaged with componentize-py.
    Python,
    /// JavaScript or TypeScript, type-checked by tsc, bundled by rolldown and packaged on the
    /// QuickJS engine by componentize-qjs.
    Js,
    /// C, bound with `wit-bindgen c` and compiled with `zig cc`.
    C,
}

impl Language {
    /// The name used on the command line and as the template folder.
    pub fn name(self) -> &'static str {
        match self {
            Language::Rust => "rust",
            Language::Python => "python",
            Language::Js => "js",
            Language::C => "c",
        }
    }
}

impl fmt::Display for Language {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Why a project could not be written.
#[derive(Debug, thiserror::Error)]
pub enum ScaffoldError {
    /// The name cannot name a package in every language's tooling.
    #[error(
        "{0:?} is not a usable handler name: use lowercase letters, digits and single dashes, \
         starting with a letter (e.g. `docs-embedder`)"
    )]
    InvalidName(String),
    /// The target folder exists and is not empty; nothing was written.
    #[error("{} already exists and is not empty; choose another name or folder", .0.display())]
    NotEmpty(PathBuf),
    /// This binary was built without a template for the language.
    #[error("this build of pgstream-host has no {0} template")]
    MissingTemplate(Language),
    /// Writing a file failed.
    #[error("cannot write {}", path.display())]
    Write {
        /// The file or folder being written.
        path: PathBuf,
        /// What the file system said.
        #[source]
        source: std::io::Error,
    },
}

/// One file of a rendered project.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProjectFile {
    /// Path inside the project folder.
    pub path: PathBuf,
    /// The file's bytes, placeholders replaced.
    pub contents: Vec<u8>,
    /// Whether the file is a script to run (gets the executable bit on Unix).
    pub executable: bool,
}

/// Renders the project `name` for `language`: every file it consists of, in a stable order.
pub fn render(language: Language, name: &str) -> Result<Vec<ProjectFile>, ScaffoldError> {
    if !is_valid_name(name) {
        return Err(ScaffoldError::InvalidName(name.to_owned()));
    }
    let template = TEMPLATES
        .get_dir(language.name())
        .ok_or(ScaffoldError::MissingTemplate(language))?;
    let snake = name.replace('-', "_");
    let substitute = |text: &str| {
        text.replace("{{name}}", name)
            .replace("{{name_snake}}", &snake)
    };

    let mut files = Vec::new();
    collect_files(template, template.path(), &mut |relative, bytes| {
        let path = PathBuf::from(substitute(&relative.to_string_lossy()));
        // Templates are text; a binary file (none today) would be copied as it is.
        let contents = match std::str::from_utf8(bytes) {
            Ok(text) => substitute(text).into_bytes(),
            Err(_) => bytes.to_vec(),
        };
        let executable = path.extension().is_some_and(|ext| ext == "sh");
        files.push(ProjectFile {
            path,
            contents,
            executable,
        });
    });
    for (_, path, contents) in SHARED_FILES
        .iter()
        .filter(|(shared_by, ..)| *shared_by == language)
    {
        files.push(ProjectFile {
            path: PathBuf::from(path),
            contents: contents.as_bytes().to_vec(),
            executable: false,
        });
    }
    files.push(ProjectFile {
        path: PathBuf::from("wit/handler.wit"),
        contents: HANDLER_WIT.as_bytes().to_vec(),
        executable: false,
    });
    if language == Language::Rust {
        // The example's lock file, for its root package renamed: the project's first build
        // then uses the dependency versions the example is tested with, not whatever
        // crates.io has that day.
        files.push(ProjectFile {
            path: PathBuf::from("Cargo.lock"),
            contents: EXAMPLE_CARGO_LOCK
                .replace("name = \"embed-handler\"", &format!("name = \"{name}\""))
                .into_bytes(),
            executable: false,
        });
        collect_files(
            &GUEST_SDK_SOURCES,
            GUEST_SDK_SOURCES.path(),
            &mut |relative, bytes| {
                files.push(ProjectFile {
                    path: Path::new("pgstream-guest/src").join(relative),
                    contents: bytes.to_vec(),
                    executable: false,
                });
            },
        );
    }
    files.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(files)
}

/// Writes the project `name` for `language` into `folder`, which must be missing or empty.
/// Returns the files written, relative to `folder`.
pub fn create(
    language: Language,
    name: &str,
    folder: &Path,
) -> Result<Vec<ProjectFile>, ScaffoldError> {
    let files = render(language, name)?;
    let occupied = std::fs::read_dir(folder)
        .map(|mut entries| entries.next().is_some())
        .unwrap_or(false);
    if occupied {
        return Err(ScaffoldError::NotEmpty(folder.to_path_buf()));
    }
    for file in &files {
        let path = folder.join(&file.path);
        let write_error = |source| ScaffoldError::Write {
            path: path.clone(),
            source,
        };
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(write_error)?;
        }
        std::fs::write(&path, &file.contents).map_err(write_error)?;
        #[cfg(unix)]
        if file.executable {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))
                .map_err(write_error)?;
        }
    }
    Ok(files)
}

/// Whether `name` works as a package name for cargo, pip, npm and a C file name: lowercase
/// ASCII letters and digits in dash-separated words, starting with a letter.
fn is_valid_name(name: &str) -> bool {
    name.len() <= 64
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name.split('-').all(|word| {
            !word.is_empty()
                && word
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        })
}

/// Calls `visit` with the path (relative to `root`) and bytes of every file under `dir`.
fn collect_files(dir: &Dir<'_>, root: &Path, visit: &mut dyn FnMut(&Path, &[u8])) {
    for entry in dir.entries() {
        match entry {
            DirEntry::Dir(child) => collect_files(child, root, visit),
            DirEntry::File(file) => {
                let relative = file.path().strip_prefix(root).unwrap_or(file.path());
                visit(relative, file.contents());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for good in ["a", "docs-embedder", "h2", "my-handler-v2"] {
            assert!(is_valid_name(good), "{good}");
        }
        for bad in ["", "Docs", "-a", "a-", "a--b", "2a", "a_b", "a b", "ü"] {
            assert!(!is_valid_name(bad), "{bad}");
        }
        assert!(matches!(
            render(Language::Rust, "Bad Name"),
            Err(ScaffoldError::InvalidName(_))
        ));
    }

    #[test]
    fn rust_project_has_the_contract_the_sdk_and_the_name() {
        let files = render(Language::Rust, "docs-embedder").unwrap();
        let file = |path: &str| {
            files
                .iter()
                .find(|file| file.path == Path::new(path))
                .unwrap_or_else(|| panic!("{path} missing from {files:#?}"))
        };
        assert_eq!(file("wit/handler.wit").contents, HANDLER_WIT.as_bytes());
        assert!(file("pgstream-guest/src/lib.rs").contents.len() > 1000);
        let manifest = String::from_utf8(file("Cargo.toml").contents.clone()).unwrap();
        assert!(manifest.contains("name = \"docs-embedder\""), "{manifest}");
        let lock = String::from_utf8(file("Cargo.lock").contents.clone()).unwrap();
        assert!(lock.contains("name = \"docs-embedder\""), "{lock}");
        assert!(lock.contains("name = \"wit-bindgen\""), "{lock}");
        assert!(!lock.contains("embed-handler"), "{lock}");
        for file in &files {
            let text = String::from_utf8_lossy(&file.contents);
            assert!(
                !text.contains("{{name"),
                "{} keeps a placeholder",
                file.path.display()
            );
        }
    }

    #[test]
    fn the_copied_sdk_uses_the_sdks_wit_bindgen() {
        let wit_bindgen = |manifest: &'static str| {
            manifest
                .lines()
                .find(|line| line.starts_with("wit-bindgen"))
                .expect("a wit-bindgen dependency")
        };
        assert_eq!(
            wit_bindgen(include_str!("../../guest-sdk/Cargo.toml")),
            wit_bindgen(include_str!(
                "../../templates/rust/pgstream-guest/Cargo.toml"
            ))
        );
    }

    #[test]
    fn an_occupied_folder_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("keep.txt"), "mine").unwrap();
        let error = create(Language::Rust, "x", dir.path()).unwrap_err();
        assert!(matches!(error, ScaffoldError::NotEmpty(_)), "{error}");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
