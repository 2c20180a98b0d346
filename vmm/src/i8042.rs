//! Just enough of the i8042 keyboard controller for a guest to stop itself.
//!
//! Linux (`reboot=k`) and our test guest reset the machine by writing 0xfe (pulse reset line) to
//! the command port 0x64; for a cell that means "the VM is done". Everything else reads as an
//! idle controller with no data, so probing guests move on.

/// Data port.
pub const DATA_PORT: u16 = 0x60;
/// Command/status port.
pub const COMMAND_PORT: u16 = 0x64;
const CMD_PULSE_RESET: u8 = 0xfe;

/// What a write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Effect {
    /// Nothing the VMM cares about.
    None,
    /// The guest asked for a CPU reset.
    Reset,
}

/// The controller (stateless: reads never change anything).
#[derive(Debug, Default)]
pub struct I8042;

impl I8042 {
    /// `in` from a controller port: status 0 (no data, input buffer empty), data 0.
    pub fn read(&self, _port: u16) -> u8 {
        0
    }

    /// `out` to a controller port.
    pub fn write(&self, port: u16, value: u8) -> Effect {
        if port == COMMAND_PORT && value == CMD_PULSE_RESET {
            Effect::Reset
        } else {
            Effect::None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_pulse_reset_on_command_port_resets() {
        let k = I8042;
        assert_eq!(k.write(COMMAND_PORT, 0xfe), Effect::Reset);
        assert_eq!(k.write(DATA_PORT, 0xfe), Effect::None);
        assert_eq!(k.write(COMMAND_PORT, 0xaa), Effect::None);
        assert_eq!(k.read(COMMAND_PORT), 0);
    }
}
