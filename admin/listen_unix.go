//go:build unix

package admin

import (
	"io/fs"
	"syscall"
)

// restrictBeforeBind gives the socket mode before bind(2) creates its file.
// Linux creates the file with the socket's mode less the umask, so the file
// is never more open than mode, not even until Listen's chmod; systems that
// refuse the fchmod still get that chmod.
func restrictBeforeBind(c syscall.RawConn, mode fs.FileMode) error {
	return c.Control(func(fd uintptr) {
		syscall.Fchmod(int(fd), uint32(mode.Perm())) // best effort: see above
	})
}
