package config

import (
	"os"
	"path/filepath"
	"strings"
)

// isRoot reports whether stsmap runs as root. Tests replace it: they cannot
// change their euid.
var isRoot = func() bool { return os.Geteuid() == 0 }

// StorePath returns the bolt file policies persist in: cache.path, or when
// that is empty the first that applies of
//
//   - $STATE_DIRECTORY/policies.db, set by systemd for StateDirectory= (the
//     first directory when it lists several, separated by colons),
//   - /var/lib/stsmap/policies.db when running as root,
//   - $XDG_STATE_HOME/stsmap/policies.db,
//   - ~/.local/state/stsmap/policies.db.
//
// It reads the environment and the euid on every call. A relative
// STATE_DIRECTORY or XDG_STATE_HOME is ignored, as the XDG Base Directory
// Specification asks. The error says that none applies: no HOME.
func (c *Config) StorePath() (string, error) {
	if c.Cache.Path != "" {
		return c.Cache.Path, nil
	}
	dir, _, _ := strings.Cut(os.Getenv("STATE_DIRECTORY"), ":")
	if filepath.IsAbs(dir) {
		return filepath.Join(dir, "policies.db"), nil
	}
	if isRoot() {
		return "/var/lib/stsmap/policies.db", nil
	}
	if dir := os.Getenv("XDG_STATE_HOME"); filepath.IsAbs(dir) {
		return filepath.Join(dir, "stsmap", "policies.db"), nil
	}
	if home, err := os.UserHomeDir(); err == nil && filepath.IsAbs(home) {
		return filepath.Join(home, ".local", "state", "stsmap", "policies.db"), nil
	}
	return "", &configError{path: "cache.path", msg: "is not set and has no default here: not running as root, and none of STATE_DIRECTORY, XDG_STATE_HOME and HOME is an absolute path; set cache.path"}
}
