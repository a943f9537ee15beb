//go:build !unix

package admin

import (
	"io/fs"
	"syscall"
)

// restrictBeforeBind does nothing where fchmod(2) does not exist: Listen's
// chmod sets the mode.
func restrictBeforeBind(syscall.RawConn, fs.FileMode) error { return nil }
